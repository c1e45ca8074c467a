//! Traces: two nodes export over OTLP to a real OTLP/gRPC receiver on loopback (a tonic
//! `TraceService` in this test); one message's trace holds spans from both nodes: send and
//! commit and publish on the node the sender is connected to, delivery on the node of the
//! receiver, joined through the trace context in the NATS headers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, ServerBuilder, Ws, token, unique};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[async_trait::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A received span: its trace, name and the node (service.instance.id) that sent it.
#[derive(Debug, Clone)]
struct Span {
    trace: Vec<u8>,
    name: String,
    node: String,
    attrs: BTreeMap<String, String>,
}

impl Receiver {
    fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for req in self.0.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                let node = rs
                    .resource
                    .as_ref()
                    .and_then(|r| {
                        r.attributes
                            .iter()
                            .find(|kv| kv.key == "service.instance.id")
                    })
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(AnyValue::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        let attrs = s
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                let v = match kv.value.as_ref()?.value.as_ref()? {
                                    AnyValue::StringValue(s) => s.clone(),
                                    AnyValue::IntValue(i) => i.to_string(),
                                    other => format!("{other:?}"),
                                };
                                Some((kv.key.clone(), v))
                            })
                            .collect();
                        out.push(Span {
                            trace: s.trace_id.clone(),
                            name: s.name.clone(),
                            node: node.clone(),
                            attrs,
                        });
                    }
                }
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_trace_spans_both_nodes() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let node = || {
        ServerBuilder::new(Backend::Postgres)
            .nats()
            .arg("--otlp-endpoint")
            .arg(endpoint.clone())
            .arg("--trace-sample-ratio")
            .arg("1")
            .arg("--drain-window-ms")
            .arg("0")
            .start()
    };
    let (a, b) = (node(), node());
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = a.api(&alice).create_channel("traced", &[&bob]).await;
    let mut bob_ws = Ws::connect(&b, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;
    let mut alice_ws = Ws::connect(&a, &token(&alice)).await;
    let ack = alice_ws
        .request(json!({ "type": "message.send", "channel_id": channel,
            "client_msg_id": "traced-1", "text": "follow me" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].as_u64().unwrap().to_string();
    let ev = bob_ws.next_event().await;
    assert_eq!(ev["seq"].as_u64().unwrap().to_string(), seq);

    // SIGTERM flushes the batched spans (drain window 0: at once).
    a.terminate();
    b.terminate();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (trace, spans) = loop {
        let spans = receiver.spans();
        // The trace of the send: the span on A that started it.
        let found = spans
            .iter()
            .find(|s| s.name == "ws.message.send")
            .map(|s| s.trace.clone())
            .and_then(|t| {
                let of_trace: Vec<Span> = spans.iter().filter(|s| s.trace == t).cloned().collect();
                let delivered_on_b = of_trace.iter().any(|s| {
                    s.name == "bus.deliver"
                        && s.attrs.get("seq") == Some(&seq)
                        && of_trace
                            .iter()
                            .any(|o| o.name == "ws.message.send" && o.node != s.node)
                });
                delivered_on_b.then_some((t, of_trace))
            });
        if let Some(found) = found {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no trace with the send on one node and its delivery on the other; spans: {:?}",
            spans
                .iter()
                .map(|s| (s.name.as_str(), s.node.as_str()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nodes: BTreeSet<&str> = spans.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(
        nodes.len(),
        2,
        "spans of one trace from both nodes: {nodes:?}"
    );
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let frame = spans
        .iter()
        .find(|s| s.name == "ws.frame")
        .expect("ws.frame");
    assert_eq!(
        frame.attrs.get("op").map(String::as_str),
        Some("message.send")
    );
    // The WS operation's span carries its request id (the frame's `id`, echoed in the ack).
    assert_eq!(
        frame.attrs.get("request_id").map(String::as_str),
        ack["id"].as_str(),
        "ws.frame span attributes: {:?}",
        frame.attrs
    );
    for name in [
        "ws.frame",
        "ws.message.send",
        "storage.commit",
        "bus.publish",
        "bus.deliver",
    ] {
        assert!(
            names.contains(name),
            "{name} missing from trace {trace:?}: {names:?}"
        );
    }
    // No exporter self-tracing (h2, tonic, hyper, tower) reached the receiver.
    for s in receiver.spans() {
        assert!(
            !["h2", "tonic", "hyper", "tower"]
                .iter()
                .any(|t| s.name.starts_with(t)),
            "exporter span {}",
            s.name
        );
    }
}
