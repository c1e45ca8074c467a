//! Just enough STUN (RFC 8489) to route a datagram to the right participant: the local ufrag of
//! a binding request's `USERNAME` (`<our ufrag>:<their ufrag>`, RFC 8445 §7.2.2). Integrity is
//! checked later by that participant's str0m ICE agent; this only picks the candidate.

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const HEADER_LEN: usize = 20;
const ATTR_USERNAME: u16 = 0x0006;

/// Whether the datagram looks like STUN (first two bits zero, magic cookie; RFC 7983 §7).
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= HEADER_LEN && data[0] < 2 && data[4..8] == MAGIC_COOKIE
}

/// The part of `USERNAME` before the colon (our ufrag), if this is STUN with a username.
pub fn local_ufrag(data: &[u8]) -> Option<&str> {
    if !is_stun(data) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let body = data.get(HEADER_LEN..HEADER_LEN + len)?;
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let value_len = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + value_len)?;
        if kind == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next().filter(|u| !u.is_empty());
        }
        // Attributes are padded to 4 bytes.
        at += 4 + value_len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![];
        for (kind, value) in attrs {
            body.extend_from_slice(&kind.to_be_bytes());
            body.extend_from_slice(&(value.len() as u16).to_be_bytes());
            body.extend_from_slice(value);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn finds_the_local_ufrag_after_other_attributes() {
        let m = binding_request(&[(0x8029, &[1; 8]), (ATTR_USERNAME, b"sfuX:cli")]);
        assert!(is_stun(&m));
        assert_eq!(local_ufrag(&m), Some("sfuX"));
        let m = binding_request(&[(0x0024, &[0; 3]), (ATTR_USERNAME, b"abc:defgh")]);
        assert_eq!(local_ufrag(&m), Some("abc"));
    }

    #[test]
    fn non_stun_and_truncated_input_give_none() {
        assert_eq!(local_ufrag(&[]), None);
        // DTLS and RTP first bytes.
        assert_eq!(local_ufrag(&[22; 40]), None);
        assert_eq!(local_ufrag(&[0x80; 40]), None);
        let m = binding_request(&[(ATTR_USERNAME, b"sfuX:cli")]);
        for cut in 0..m.len() {
            // Never panics; only the full message yields the ufrag.
            let got = local_ufrag(&m[..cut]);
            assert!(got.is_none() || cut == m.len(), "{cut}");
        }
        // Without USERNAME, or with an empty local part.
        assert_eq!(local_ufrag(&binding_request(&[(0x8029, &[1; 8])])), None);
        assert_eq!(
            local_ufrag(&binding_request(&[(ATTR_USERNAME, b":x")])),
            None
        );
        // A length field pointing past the end.
        let mut m = binding_request(&[(ATTR_USERNAME, b"a:b")]);
        m[2] = 0xff;
        assert_eq!(local_ufrag(&m), None);
    }
}
