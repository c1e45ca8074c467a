//! Arguments of `EXECUTE` written as SQL text, for the send batch that goes as one simple-query
//! message ([`super::commit_fast`]). Every string goes through `postgres-protocol`'s
//! `escape_literal` (libpq's `PQescapeLiteral`: quotes doubled, and `E'...'` with backslashes
//! doubled when there are any), so the text is right whatever `standard_conforming_strings` is.
//! A string with a NUL cannot be sent this way (the query message is NUL-terminated): callers
//! check [`has_nul`] first and take the parameterized path.

use std::fmt::Write;

use postgres_protocol::escape::escape_literal;

/// An `EXECUTE name(arg, ...)` statement being written into `sql`.
pub(super) struct Execute<'s> {
    sql: &'s mut String,
    args: usize,
}

impl<'s> Execute<'s> {
    pub(super) fn new(sql: &'s mut String, statement: &str) -> Self {
        sql.push_str("EXECUTE ");
        sql.push_str(statement);
        sql.push('(');
        Execute { sql, args: 0 }
    }

    fn next_arg(&mut self) {
        if self.args > 0 {
            self.sql.push_str(", ");
        }
        self.args += 1;
    }

    /// `ARRAY['a', 'b']::TEXT[]`
    pub(super) fn texts<'a>(mut self, items: impl IntoIterator<Item = &'a str>) -> Self {
        self.opt_texts_inner(items.into_iter().map(Some));
        self
    }

    /// `ARRAY['a', NULL]::TEXT[]`
    pub(super) fn opt_texts<'a>(
        mut self,
        items: impl IntoIterator<Item = Option<&'a str>>,
    ) -> Self {
        self.opt_texts_inner(items.into_iter());
        self
    }

    fn opt_texts_inner<'a>(&mut self, items: impl Iterator<Item = Option<&'a str>>) {
        self.next_arg();
        self.sql.push_str("ARRAY[");
        for (k, item) in items.enumerate() {
            if k > 0 {
                self.sql.push(',');
            }
            match item {
                Some(s) => self.sql.push_str(&escape_literal(s)),
                None => self.sql.push_str("NULL"),
            }
        }
        self.sql.push_str("]::TEXT[]");
    }

    /// `ARRAY[1, 2]::BIGINT[]`
    pub(super) fn bigints(mut self, items: &[i64]) -> Self {
        self.next_arg();
        self.sql.push_str("ARRAY[");
        for (k, n) in items.iter().enumerate() {
            if k > 0 {
                self.sql.push(',');
            }
            push_int(self.sql, *n);
        }
        self.sql.push_str("]::BIGINT[]");
        self
    }

    /// `1::BIGINT`
    pub(super) fn bigint(mut self, n: i64) -> Self {
        self.next_arg();
        push_int(self.sql, n);
        self.sql.push_str("::BIGINT");
        self
    }

    /// Closes the statement (`);`).
    pub(super) fn end(self) {
        self.sql.push_str(");\n");
    }
}

/// Writes `n` in decimal, without a temporary string (a batch writes several per message).
fn push_int(sql: &mut String, n: i64) {
    // Writing into a `String` cannot fail.
    let _ = write!(sql, "{n}");
}

/// Whether a string cannot go into a simple-query message.
pub(super) fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_escaped_literals_with_their_types() {
        let mut sql = String::new();
        Execute::new(&mut sql, "parley_x")
            .texts(["a'b", "c\\d"])
            .opt_texts([None, Some("e")])
            .bigints(&[1, -2])
            .bigint(7)
            .end();
        assert_eq!(
            sql,
            "EXECUTE parley_x(ARRAY['a''b', E'c\\\\d']::TEXT[], ARRAY[NULL,'e']::TEXT[], \
             ARRAY[1,-2]::BIGINT[], 7::BIGINT);\n"
        );
    }

    #[test]
    fn an_empty_array_keeps_its_type() {
        let mut sql = String::new();
        Execute::new(&mut sql, "s").texts([]).bigints(&[]).end();
        assert_eq!(sql, "EXECUTE s(ARRAY[]::TEXT[], ARRAY[]::BIGINT[]);\n");
    }

    #[test]
    fn a_nul_is_found() {
        assert!(has_nul("a\0b"));
        assert!(!has_nul("ab"));
    }
}
