//! Liberal in what intake reads, like the reference servers: a JSON body is read
//! whatever common label it carries (JSON, text/plain, form-urlencoded, none) and
//! however it is compressed (gzip, deflate, br, identity) — an SDK that gzips JSON
//! and labels it form-urlencoded got 415 before. Any other label gets a 415 that
//! names what is accepted.

mod support;

use std::io::Write;

use serde_json::Value;
use support::{client, gzip, id_counts, status_and_json, track, Server};

fn post(server: &Server, content_type: Option<&str>, encoding: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut request = client().post(server.url("/v1/track")).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(encoding) = encoding {
        request = request.header("content-encoding", encoding);
    }
    status_and_json(request.send().unwrap())
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::BrotliCompress(&mut &data[..], &mut out, &brotli::enc::BrotliEncoderParams::default()).unwrap();
    out
}

#[test]
fn json_is_read_under_every_common_label_and_encoding() {
    let server = Server::start();
    let labels = [
        Some("application/json"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        None,
    ];
    type Encode = fn(&[u8]) -> Vec<u8>;
    let encodings: [(Option<&str>, Encode); 4] = [
        (None, |b| b.to_vec()),
        (Some("gzip"), gzip),
        (Some("deflate"), deflate),
        (Some("br"), brotli),
    ];
    let mut sent = Vec::new();
    for label in labels {
        for (encoding, encode) in encodings {
            let id = format!("{}-{}", label.unwrap_or("none"), encoding.unwrap_or("identity"));
            let body = encode(track(&id).to_string().as_bytes());
            let (status, answer) = post(&server, label, encoding, body);
            assert_eq!(status, 200, "{label:?} {encoding:?}: {answer}");
            sent.push(id);
        }
    }
    let counts = id_counts(&server.sink_events());
    for id in &sent {
        assert_eq!(counts.get(id), Some(&1), "{id} stored once");
    }
}

#[test]
fn other_labels_get_a_415_naming_what_is_accepted() {
    let server = Server::start();
    let body = track("x").to_string().into_bytes();
    let (status, answer) = post(&server, Some("application/xml"), None, body.clone());
    assert_eq!(status, 415, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    for accepted in ["application/json", "text/plain", "application/x-www-form-urlencoded"] {
        assert!(message.contains(accepted), "{message}");
    }
    let (status, answer) = post(&server, Some("application/json"), Some("zstd"), body);
    assert_eq!(status, 415, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    for accepted in ["gzip", "deflate", "br", "identity"] {
        assert!(message.contains(accepted), "{message}");
    }
    // Labelled gzip but not gzip: a 400 that says so, nothing stored.
    let (status, answer) = post(&server, Some("application/json"), Some("gzip"), b"{}".to_vec());
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("invalid_gzip")));
    let (status, answer) = post(&server, Some("application/json"), Some("br"), b"{not br".to_vec());
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_compression"))
    );
    assert!(server.sink_events().is_empty());
}
