//! A TCP relay with `TCP_NODELAY` in front of a fake engine, so that it answers as a real engine's
//! server does.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A TCP relay in front of a fake engine, so that it answers as a real engine's server does: the
/// fakes are served by `axum::serve`, which leaves Nagle's algorithm on, so a streamed answer's first
/// chunk, written after its headers, waits for the client's delayed ACK of the headers (40 ms on
/// Linux, once the keep-alive connection is in its request-response mode), where uvicorn (vLLM,
/// SGLang) sets `TCP_NODELAY`. The relay's sockets have `TCP_NODELAY`, and it reads the engine with
/// `TCP_QUICKACK` set before each read, so that the engine's writes are acknowledged at once and go
/// out as they are made. Answers the relay's URL.
pub(super) async fn nodelay_front(engine_url: &str) -> anyhow::Result<String> {
    let engine: std::net::SocketAddr = engine_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(engine).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let fd = std::os::fd::AsRawFd::as_raw_fd(&upstream);
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_engine, mut to_engine) = upstream.into_split();
                let requests = tokio::io::copy(&mut from_client, &mut to_engine);
                let answers = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        quickack(fd);
                        match from_engine.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to_client.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = requests => {}
                    () = answers => {}
                }
            });
        }
    });
    Ok(url)
}

/// Leaves the socket's delayed-ACK mode: what comes next is acknowledged once read.
fn quickack(fd: std::os::fd::RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open TCP socket owned by the relay's task (its halves are alive while it
    // reads), and the option's value is a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
