//! A small HTTP/1.1 server on 127.0.0.1 for download tests: each path
//! gets a fixed reply (the body, a body cut short of its Content-Length,
//! or an error status). It runs until the test process ends.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;

/// What the server answers for one path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// 200 with this file's content as it is when asked (404 while it is
    /// missing), for files a test writes after the URL is known.
    File(std::path::PathBuf),
    /// 200 announcing `declared` bytes, sending `body` (fewer), then
    /// closing the connection.
    Truncated { body: Vec<u8>, declared: usize },
    /// This status with a short text body.
    Status(u16, &'static str),
}

/// Serves `routes` (`/x.qcow2` -> reply, whatever the query string;
/// anything else is a 404) and
/// returns the base URL, `http://127.0.0.1:PORT`.
pub fn serve(routes: Vec<(&str, Reply)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let routes: Arc<Vec<(String, Reply)>> = Arc::new(
        routes
            .into_iter()
            .map(|(path, reply)| (path.to_owned(), reply))
            .collect(),
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let routes = routes.clone();
            std::thread::spawn(move || answer(stream, &routes));
        }
    });
    base
}

fn answer(stream: TcpStream, routes: &[(String, Reply)]) {
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    let mut request = String::new();
    let _ = reader.read_line(&mut request);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target);
    let reply = match routes.iter().find(|(route, _)| route == path) {
        Some((_, Reply::File(file))) => std::fs::read(file)
            .map(Reply::Body)
            .unwrap_or(Reply::Status(404, "Not Found")),
        Some((_, reply)) => reply.clone(),
        None => Reply::Status(404, "Not Found"),
    };
    let mut stream = stream;
    let (status, declared, body) = match reply {
        Reply::Body(body) => ("200 OK".to_owned(), body.len(), body),
        Reply::Truncated { body, declared } => ("200 OK".to_owned(), declared, body),
        // Read above: never reaches here as a file.
        Reply::File(_) => ("404 Not Found".to_owned(), 0, Vec::new()),
        Reply::Status(code, reason) => {
            let body = format!("{code} {reason}\n").into_bytes();
            (format!("{code} {reason}"), body.len(), body)
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {declared}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.write_all(&body);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}
