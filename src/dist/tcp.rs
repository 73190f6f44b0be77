//! Host collectives between processes over the rendezvous' TCP links, star-shaped: every rank
//! sends its values to rank 0, which combines them in rank order (the same sum as the
//! in-process group's) and sends the result back. For CPU ranks (`vox2vec-train --cpu-ranks
//! N`) and for the NCCL communicator's few host-side values (losses, the stop flag); device
//! gradients never take this path.
//!
//! Message: op u8 (1 all-reduce, 2 broadcast), root u32, count u64, then count f32 values
//! (little-endian). A closed connection or a read past the timeout is an error naming the
//! rank at the other end.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{Context, Result, bail, ensure};

use super::Communicator;
use super::rendezvous::{self, Links};

pub struct TcpComm {
    rank: usize,
    world: usize,
    links: Links,
    rounds: u64,
}

impl TcpComm {
    /// Meets the other ranks at `addr:port` (`rendezvous::meet`), rank 0 handing out
    /// `payload`; returns the communicator and the payload.
    pub fn connect(
        addr: &str,
        port: u16,
        rank: usize,
        world: usize,
        payload: &[u8],
        timeout: std::time::Duration,
    ) -> Result<(TcpComm, Vec<u8>)> {
        let (links, payload) = rendezvous::meet(addr, port, rank, world, payload, timeout)?;
        Ok((TcpComm { rank, world, links, rounds: 0 }, payload))
    }

    fn round(&mut self, op: u8, root: usize, buf: &mut [f32]) -> Result<()> {
        self.rounds += 1;
        let (me, k) = (self.rank, self.rounds);
        let what = if op == 1 { "all-reduce" } else { "broadcast" };
        match &mut self.links {
            Links::Root(peers) => {
                let mut parts = vec![buf.to_vec()];
                for (i, s) in peers.iter_mut().enumerate() {
                    let (o, r, v) =
                        read_msg(s).with_context(|| format!("rank 0: {what} #{k}: receiving from rank {}", i + 1))?;
                    ensure!(
                        o == op && r == root && v.len() == buf.len(),
                        "rank 0: {what} #{k}: rank {} sent op {o} root {r} with {} values, this rank op {op} root {root} with {}: the ranks are not running the same step",
                        i + 1,
                        v.len(),
                        buf.len()
                    );
                    parts.push(v);
                }
                let out = if op == 1 {
                    super::sum_in_rank_order(parts.iter().map(Vec::as_slice), buf.len())
                } else {
                    parts.swap_remove(root)
                };
                for (i, s) in peers.iter_mut().enumerate() {
                    write_msg(s, op, root, &out)
                        .with_context(|| format!("rank 0: {what} #{k}: sending to rank {}", i + 1))?;
                }
                buf.copy_from_slice(&out);
            }
            Links::Peer(s) => {
                write_msg(s, op, root, buf).with_context(|| format!("rank {me}: {what} #{k}: sending to rank 0"))?;
                let (_, _, v) = read_msg(s).with_context(|| format!("rank {me}: {what} #{k}: waiting for rank 0"))?;
                ensure!(
                    v.len() == buf.len(),
                    "rank {me}: {what} #{k}: rank 0 sent {} values, expected {}",
                    v.len(),
                    buf.len()
                );
                buf.copy_from_slice(&v);
            }
        }
        Ok(())
    }
}

fn write_msg(s: &mut TcpStream, op: u8, root: usize, v: &[f32]) -> Result<()> {
    let mut msg = Vec::with_capacity(13 + 4 * v.len());
    msg.push(op);
    msg.extend((root as u32).to_le_bytes());
    msg.extend((v.len() as u64).to_le_bytes());
    msg.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    s.write_all(&msg).map_err(explain)
}

fn read_msg(s: &mut TcpStream) -> Result<(u8, usize, Vec<f32>)> {
    let mut head = [0u8; 13];
    s.read_exact(&mut head).map_err(explain)?;
    let n = u64::from_le_bytes(head[5..13].try_into()?) as usize;
    ensure!(n <= 1 << 32, "a message of {n} values");
    let mut bytes = vec![0u8; 4 * n];
    s.read_exact(&mut bytes).map_err(explain)?;
    Ok((
        head[0],
        u32::from_le_bytes(head[1..5].try_into()?) as usize,
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
    ))
}

/// The two ways a peer goes missing, in words.
fn explain(e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            anyhow::anyhow!("the connection closed: that rank's process stopped (see its own error)")
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow::anyhow!("timed out (VOX2VEC_DIST_TIMEOUT sets the limit)")
        }
        _ => e.into(),
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.round(1, 0, buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            bail!("broadcast from rank {root} of {}", self.world);
        }
        self.round(2, root, buf)
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tcp_ranks_sum_in_rank_order_and_a_dead_rank_is_named() {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
        let t = Duration::from_secs(20);
        let hs: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let (mut c, _) = TcpComm::connect("127.0.0.1", port, r, 3, b"", t).unwrap();
                    let mut a = vec![0.1f32 * (r + 1) as f32, r as f32];
                    c.all_reduce_sum(&mut a).unwrap();
                    let mut b = vec![r as f32];
                    c.broadcast(&mut b, 1).unwrap();
                    if r == 2 {
                        return (a, b, None); // rank 2 leaves before the third collective
                    }
                    let e = c.all_reduce_sum(&mut [1.0]).err().map(|e| format!("{e:#}"));
                    (a, b, e)
                })
            })
            .collect();
        let want = [0.1f32, 0.2, 0.3].iter().fold(0.0f32, |s, v| s + v);
        for (r, h) in hs.into_iter().enumerate() {
            let (a, b, e) = h.join().unwrap();
            assert_eq!(a, vec![want, 3.0]);
            assert_eq!(b, vec![1.0]);
            if r < 2 {
                let e = e.expect("the collective after rank 2 left must fail");
                assert!(e.contains("stopped"), "rank {r}: {e}");
            }
        }
    }
}
