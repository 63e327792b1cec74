//! The HTTP client of `lb flows`, `lb peers`, `lb install` and `lb remove` (and of the tests):
//! one request per connection to the member's own admin API, on hyper's HTTP/1.1 client, the
//! implementation that serves that API. hyper parses the status line and headers, decodes
//! chunked bodies (the streamed `/flows` answer) and enforces its header limits; this module
//! adds the timeouts and the messages an operator reads.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;

/// How long to wait for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the whole answer may take (a full `/flows` of millions of entries takes seconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one request and returns the status code and the body (which must be UTF-8, as every
/// admin API answer is).
///
/// Blocking. It runs its own single-threaded runtime on the calling thread (so a thread that
/// entered a network namespace makes the request from there), or on a scoped thread when
/// called from inside a runtime.
pub fn request(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the HTTP client")?
            .block_on(send(admin, method, path, body))
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(run).join().unwrap_or_else(|_| bail!("the HTTP client panicked")))
    } else {
        run()
    }
}

async fn send(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let unreachable =
        || format!("cannot reach the admin API at {admin} (is `lb run` up, and is [admin] listen right?)");
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(admin))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(unreachable)?;
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection future moves the bytes; it ends when the answer is complete.
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, admin.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
        let answer = sender.send_request(request).await?;
        let status = answer.status().as_u16();
        let bytes = answer.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{method} {path}: no complete answer from {admin} within {ANSWER_TIMEOUT:?}"))?
        .with_context(|| format!("{method} {path}: bad HTTP answer from {admin}"))?;
    let text = String::from_utf8(bytes.into()).with_context(|| format!("{method} {path}: answer is not UTF-8"))?;
    Ok((status, text))
}

/// GETs a path and parses the JSON body, turning HTTP errors into messages.
pub fn get_json<T: serde::de::DeserializeOwned>(admin: SocketAddr, path: &str) -> anyhow::Result<T> {
    let (status, body) = request(admin, "GET", path, None)?;
    if status != 200 {
        bail!("{path}: HTTP {status}: {}", body.trim_end());
    }
    serde_json::from_str(&body).with_context(|| format!("{path}: unexpected answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Serves one canned answer on loopback and returns the request it read.
    fn serve_once(answer: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, t)
    }

    #[test]
    fn chunked_answers_are_decoded() {
        let (addr, t) =
            serve_once(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n");
        let (status, body) = request(addr, "GET", "/flows?limit=0", None).unwrap();
        assert_eq!((status, body.as_str()), (200, "{\"a\":1}"));
        let req = t.join().unwrap();
        assert!(req.starts_with("GET /flows?limit=0 HTTP/1.1\r\n"), "{req}");
        assert!(req.to_ascii_lowercase().contains(&format!("host: {addr}")), "{req}");
    }

    #[test]
    fn errors_name_the_status_and_the_body() {
        let (addr, _t) = serve_once(
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 24\r\n\r\n{\"error\":\"no such path\"}",
        );
        let e = get_json::<serde_json::Value>(addr, "/nope").unwrap_err().to_string();
        assert!(e.contains("HTTP 404") && e.contains("no such path"), "{e}");
    }

    #[test]
    fn garbage_and_bad_utf8_are_errors_not_guesses() {
        let (addr, _t) = serve_once(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        let e = format!("{:#}", request(addr, "GET", "/peers", None).unwrap_err());
        assert!(e.contains("bad HTTP answer"), "{e}");
        let (addr, _t) = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n\xff\xfe");
        let e = format!("{:#}", request(addr, "GET", "/peers", None).unwrap_err());
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn an_unreachable_member_says_where_it_looked() {
        // A port nobody listens on: bind, learn it, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = format!("{:#}", request(addr, "GET", "/peers", None).unwrap_err());
        assert!(e.contains("cannot reach the admin API") && e.contains(&addr.to_string()), "{e}");
    }

    #[tokio::test]
    async fn works_from_inside_a_runtime() {
        let (addr, _t) = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n");
        assert_eq!(request(addr, "GET", "/ready", None).unwrap(), (200, "ready\n".to_string()));
    }
}
