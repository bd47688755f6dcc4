//! The datagram transport gossip runs over, behind a small trait so tests
//! (an in-memory network, see `mem_network`) and a simulator can stand in
//! for UDP.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

/// Why a datagram was not handed to the network. Either way it is dropped
/// and counted; SWIM tolerates loss.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The outgoing queue is full; sending would block the gossip loop.
    #[error("transport queue full")]
    WouldBlock,
    /// The transport refused the datagram.
    #[error("transport send failed: {source}")]
    Io {
        /// The transport's complaint.
        #[from]
        source: io::Error,
    },
}

/// A datagram transport.
///
/// `send_to` must not block: the gossip loop calls it directly and a slow
/// network must cost dropped packets, never a stalled failure detector.
pub trait Transport: Send + Sync + 'static {
    /// The address peers reach this transport on.
    fn local_addr(&self) -> SocketAddr;

    /// Hands `packet` to the network for `to`, or says why not. Never blocks.
    fn send_to(&self, to: SocketAddr, packet: &[u8]) -> Result<(), SendError>;

    /// Waits for the next datagram, copies as much as fits into `buf` and
    /// returns its length and sender. A returned length `>= buf.len()` means
    /// the datagram may have been truncated (give a buffer one byte larger
    /// than the largest acceptable packet to detect oversize ones).
    ///
    /// An error of kind [`io::ErrorKind::NotConnected`] means the transport
    /// is closed for good; other errors are transient.
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
}

/// UDP: a tokio socket receives; a non-blocking `std` clone of the same
/// socket sends, so a send fails only when the kernel buffer is really full
/// (tokio's `try_send_to` also refuses until it has seen the socket become
/// writable, which would drop the first packets of a fresh socket).
#[derive(Debug)]
pub struct UdpTransport {
    receiver: tokio::net::UdpSocket,
    sender: std::net::UdpSocket,
    local_addr: SocketAddr,
}

impl UdpTransport {
    /// Binds a UDP socket (port 0 picks an ephemeral port). Must run inside
    /// a tokio runtime.
    pub async fn bind(addr: SocketAddr) -> io::Result<UdpTransport> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        let sender = socket.try_clone()?;
        let local_addr = socket.local_addr()?;
        let receiver = tokio::net::UdpSocket::from_std(socket)?;
        Ok(UdpTransport { receiver, sender, local_addr })
    }
}

impl Transport for UdpTransport {
    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn send_to(&self, to: SocketAddr, packet: &[u8]) -> Result<(), SendError> {
        match self.sender.send_to(packet, to) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(SendError::WouldBlock),
            Err(e) => Err(SendError::Io { source: e }),
        }
    }

    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        self.receiver.recv_from(buf)
    }
}
