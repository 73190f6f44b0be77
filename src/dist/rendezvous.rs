//! The rendezvous: how the ranks of a run find each other. Rank 0 listens on
//! MASTER_ADDR:MASTER_PORT; every other rank connects (retrying until the timeout, as rank 0
//! may start later), says who it is, and receives rank 0's payload (NCCL's unique id, or
//! nothing for the TCP communicator). The connections stay open: the TCP communicator runs
//! its collectives over them, and the NCCL one its host-side ones.
//!
//! Wire format (little-endian): hello = b"VOX2VEC\x01", world u32, rank u32; reply = status
//! u8 (0 accepted, 1 refused), then u32 length and that many bytes (the payload, or the
//! reason for refusing).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const MAGIC: &[u8; 8] = b"VOX2VEC\x01";

/// The connections a rank holds after the rendezvous.
pub enum Links {
    /// Rank 0: one stream per other rank (index r − 1 for rank r).
    Root(Vec<TcpStream>),
    /// Any other rank: its stream to rank 0.
    Peer(TcpStream),
}

/// Meets the other ranks at `addr:port`; rank 0 hands `payload` to each and gets it back.
/// Returns the links and the payload.
pub fn meet(
    addr: &str,
    port: u16,
    rank: usize,
    world: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Links, Vec<u8>)> {
    ensure!(rank < world, "rank {rank} is not below the world size {world}");
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let listener = TcpListener::bind((addr, port)).with_context(|| {
            format!("rank 0: listening on {addr}:{port} (MASTER_ADDR:MASTER_PORT) for the other ranks")
        })?;
        listener.set_nonblocking(true)?;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while peers.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let mut hello = [0u8; 16];
                    if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                        continue; // not one of ours (a port scanner, a stale client)
                    }
                    let (w, r) = (
                        u32::from_le_bytes(hello[8..12].try_into()?) as usize,
                        u32::from_le_bytes(hello[12..16].try_into()?) as usize,
                    );
                    let refuse = if w != world {
                        Some(format!("rank 0 runs a world of {world}, rank {r} at {from} says {w}"))
                    } else if r == 0 || r >= world {
                        Some(format!("rank {r} from {from} is not a rank of a world of {world}"))
                    } else if peers[r - 1].is_some() {
                        Some(format!(
                            "rank {r} connected twice (the second from {from}): two processes were given RANK={r}"
                        ))
                    } else {
                        None
                    };
                    if let Some(why) = refuse {
                        let _ = reply(&mut s, 1, why.as_bytes());
                        bail!("rendezvous at {addr}:{port}: {why}");
                    }
                    reply(&mut s, 0, payload)?;
                    s.set_read_timeout(Some(timeout))?;
                    s.set_nodelay(true)?;
                    peers[r - 1] = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            peers.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| i + 1).collect();
                        bail!(
                            "rank 0: rank(s) {missing:?} did not join at {addr}:{port} within {:.0} s (VOX2VEC_DIST_TIMEOUT sets the limit)",
                            timeout.as_secs_f64()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("rank 0: accepting a rank"),
            }
        }
        return Ok((Links::Root(peers.into_iter().map(|p| p.expect("all joined")).collect()), payload.to_vec()));
    }
    let target = (addr, port)
        .to_socket_addrs()
        .with_context(|| format!("rank {rank}: resolving MASTER_ADDR {addr}"))?
        .next()
        .with_context(|| format!("rank {rank}: {addr} resolves to no address"))?;
    let mut s = loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) => {
                if Instant::now() >= deadline {
                    bail!(
                        "rank {rank}: could not reach rank 0 at {addr}:{port} within {:.0} s: {e}",
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let mut hello = MAGIC.to_vec();
    hello.extend((world as u32).to_le_bytes());
    hello.extend((rank as u32).to_le_bytes());
    s.write_all(&hello).with_context(|| format!("rank {rank}: greeting rank 0"))?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).with_context(|| format!("rank {rank}: waiting for rank 0's answer at {addr}:{port}"))?;
    let len = u32::from_le_bytes(head[1..5].try_into()?) as usize;
    ensure!(len <= 1 << 20, "rank {rank}: rank 0 answered with {len} bytes");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    if head[0] != 0 {
        bail!("rank {rank}: rank 0 refused: {}", String::from_utf8_lossy(&body));
    }
    Ok((Links::Peer(s), body))
}

fn reply(s: &mut TcpStream, status: u8, body: &[u8]) -> Result<()> {
    let mut msg = vec![status];
    msg.extend((body.len() as u32).to_le_bytes());
    msg.extend(body);
    s.write_all(&msg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_get_rank_zeros_payload_and_duplicates_are_refused() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let peers: Vec<_> =
            (1..3).map(|r| std::thread::spawn(move || meet("127.0.0.1", port, r, 3, b"", t).map(|(_, p)| p))).collect();
        let (links, _) = meet("127.0.0.1", port, 0, 3, b"the id", t).unwrap();
        assert!(matches!(links, Links::Root(ref v) if v.len() == 2));
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), b"the id");
        }

        let port = free_port();
        let a = std::thread::spawn(move || meet("127.0.0.1", port, 1, 2, b"", t).map(|_| ()));
        std::thread::sleep(Duration::from_millis(300));
        let b = std::thread::spawn(move || meet("127.0.0.1", port, 1, 2, b"", Duration::from_secs(3)).map(|_| ()));
        std::thread::sleep(Duration::from_millis(300));
        // Rank 0 comes last and sees rank 1 twice at most: one is accepted, the other refused,
        // or rank 0 stops on the duplicate; either way no one hangs.
        let r0 = meet("127.0.0.1", port, 0, 2, b"x", Duration::from_secs(3));
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        assert!(r0.is_err() || ra.is_err() || rb.is_err(), "a duplicated rank went unnoticed");
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        let err = meet("127.0.0.1", free_port(), 0, 3, b"", Duration::from_millis(300)).err().unwrap().to_string();
        assert!(err.contains("[1, 2]") && err.contains("did not join"), "{err}");
    }
}
