//! Two nodes over real UDP on 127.0.0.1 (ephemeral ports), in real time.

mod common;

use calmkv_gossip::{GossipConfig, MemberState, Membership, UdpTransport};
use common::*;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn two_nodes_over_udp_join_see_each_other_and_notice_a_leave() {
    let seed = test_seed();
    let secret = b"udp test cluster secret".to_vec();
    let t1 = Arc::new(UdpTransport::bind("127.0.0.1:0".parse().unwrap()).await.unwrap());
    let t2 = Arc::new(UdpTransport::bind("127.0.0.1:0".parse().unwrap()).await.unwrap());
    let addr1 = calmkv_gossip::Transport::local_addr(&*t1);

    let mut c1 = GossipConfig::new(1, meta(1));
    c1.cluster_secret = Some(secret.clone());
    c1.rng_seed = Some(seed);
    let mut c2 = GossipConfig::new(2, meta(2));
    c2.cluster_secret = Some(secret);
    c2.rng_seed = Some(seed + 1);
    c2.seeds = vec![addr1];

    let n1 = Membership::start(c1, t1).await.unwrap();
    let n2 = Membership::start(c2, t2).await.unwrap();
    let took = wait_for(Duration::from_secs(10), "both alive", || {
        state_of(&n1, 2) == Some(MemberState::Alive) && state_of(&n2, 1) == Some(MemberState::Alive)
    })
    .await;
    println!("joined over UDP in {took:?}");
    assert_eq!(n1.member(2).unwrap().identity, n2.identity());
    assert_eq!(n2.member(1).unwrap().identity.gossip_addr, addr1);

    n2.leave().await.unwrap();
    wait_for(Duration::from_secs(5), "leave noticed", || {
        state_of(&n1, 2) == Some(MemberState::Down)
    })
    .await;
    let m = n1.metrics();
    assert_eq!((m.dropped_auth, m.dropped_size, m.decode_errors, m.send_failures), (0, 0, 0, 0));
    assert!(m.packets_received > 0 && m.bytes_sent > 0);
    n1.shutdown().await.unwrap();
}
