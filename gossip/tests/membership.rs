//! Clusters on the in-memory network, in virtual time (`start_paused`): the
//! whole SWIM schedule runs at CPU speed and every deadline below is in
//! simulated seconds. Seeds are printed; set `CALMKV_TEST_SEED` to replay.

mod common;

use calmkv_gossip::auth::PacketAuth;
use calmkv_gossip::{
    MemNetwork, MemberState, Membership, MembershipEvent, GOSSIP_PACKET_BYTES_MAX,
};
use common::*;
use std::time::Duration;

const ALIVE: MemberState = MemberState::Alive;
const DOWN: MemberState = MemberState::Down;

fn refs(nodes: &[Membership]) -> Vec<&Membership> {
    nodes.iter().collect()
}

#[tokio::test(start_paused = true)]
async fn four_nodes_join_through_one_seed_and_see_each_other_alive() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let ids = [1, 2, 3, 4];
    let nodes = start_cluster(&net, seed, &ids, None, None).await;
    let took =
        wait_for(Duration::from_secs(10), "all alive", || all_see(&refs(&nodes), &ids, ALIVE))
            .await;
    println!("converged in {took:?} (virtual)");

    // Identities carry the metadata.
    let seen = nodes[0].member(3).unwrap();
    assert_eq!(seen.identity.meta, meta(3));
    assert_eq!(seen.identity.gossip_addr, gossip_addr(3));
    assert_eq!(seen.identity.bump, nodes[2].identity().bump);
    let metrics = nodes[0].metrics();
    assert_eq!((metrics.members_alive, metrics.members_suspect, metrics.members_down), (3, 0, 0));
    assert!(metrics.packets_sent > 0 && metrics.packets_received > 0);
    assert_eq!(metrics.dropped_auth + metrics.dropped_size + metrics.decode_errors, 0);
}

/// foca's LAN preset: probe period 1 s, suspicion 4 s. A crashed member of
/// four is first probed within 2·3 periods, suspected after one more, down
/// 4 s later, and the news spreads by gossip every 200 ms: 12 s bound.
#[tokio::test(start_paused = true)]
async fn killed_node_is_marked_down_within_the_detection_bound() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let ids = [1, 2, 3, 4];
    let mut nodes = start_cluster(&net, seed, &ids, None, None).await;
    wait_for(Duration::from_secs(10), "all alive", || all_see(&refs(&nodes), &ids, ALIVE)).await;
    let mut events = nodes[0].subscribe();

    nodes.pop().unwrap().abort();
    let took = wait_for(Duration::from_secs(12), "node 4 down everywhere", || {
        nodes.iter().all(|n| state_of(n, 4) == Some(DOWN))
    })
    .await;
    println!("crash detected by all in {took:?} (virtual)");
    assert!(all_see(&refs(&nodes), &[1, 2, 3], ALIVE));

    let mut saw_down = false;
    while let Some(event) = events.try_recv() {
        assert_eq!(event.member().identity.node_id, 4, "only node 4 changed: {event:?}");
        saw_down |= matches!(event, MembershipEvent::Down(_));
    }
    assert!(saw_down);
}

#[tokio::test(start_paused = true)]
async fn node_that_leaves_is_marked_down_promptly() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let ids = [1, 2, 3, 4];
    let mut nodes = start_cluster(&net, seed, &ids, None, None).await;
    wait_for(Duration::from_secs(10), "all alive", || all_see(&refs(&nodes), &ids, ALIVE)).await;

    nodes.pop().unwrap().leave().await.unwrap();
    let took = wait_for(Duration::from_secs(1), "node 4 down everywhere", || {
        nodes.iter().all(|n| state_of(n, 4) == Some(DOWN))
    })
    .await;
    println!("leave known by all in {took:?} (virtual)");
}

#[tokio::test(start_paused = true)]
async fn restarted_node_rejoins_at_once_under_a_new_bump() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let ids = [1, 2, 3];
    let mut nodes = start_cluster(&net, seed, &ids, None, Some(dir.path())).await;
    wait_for(Duration::from_secs(10), "all alive", || all_see(&refs(&nodes), &ids, ALIVE)).await;
    // Let the state file catch up with the membership (written every second).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let old = nodes[2].identity();
    nodes.pop().unwrap().abort();
    // Restart with the same id and state file but *no seeds*: it must find
    // the cluster through the members it remembered.
    let mut config = config(3, seed.wrapping_add(100), &[]);
    config.state_path = Some(state_path(dir.path(), 3));
    let restarted = start(&net, config).await;
    let new = restarted.identity();
    assert!(new.bump > old.bump, "bump {} then {}", old.bump, new.bump);
    nodes.push(restarted);

    let took = wait_for(Duration::from_secs(3), "new identity alive everywhere", || {
        nodes[..2]
            .iter()
            .all(|n| n.member(3).is_some_and(|m| m.identity == new && m.state == ALIVE))
    })
    .await;
    println!("restart recognised in {took:?} (virtual), before any failure detection");
    assert!(all_see(&refs(&nodes), &ids, ALIVE));

    // The old identity never comes back as alive, and nothing reports node 3 down.
    let mut events = nodes[0].subscribe();
    tokio::time::sleep(Duration::from_secs(15)).await;
    for n in &nodes[..2] {
        assert_eq!(n.member(3).unwrap().identity, new);
        assert_eq!(n.member(3).unwrap().state, ALIVE);
    }
    if let Some(event) = events.try_recv() {
        panic!("no membership change expected after the restart settled: {event:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn partitioned_minority_is_marked_down_and_rejoins_after_healing() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let ids = [1, 2, 3, 4, 5];
    let nodes = start_cluster(&net, seed, &ids, None, None).await;
    wait_for(Duration::from_secs(10), "all alive", || all_see(&refs(&nodes), &ids, ALIVE)).await;

    let majority = [gossip_addr(1), gossip_addr(2), gossip_addr(3)];
    let minority = [gossip_addr(4), gossip_addr(5)];
    net.partition(&[&majority, &minority]);
    let took = wait_for(Duration::from_secs(30), "each side sees the other down", || {
        nodes[..3].iter().all(|n| [4, 5].iter().all(|id| state_of(n, *id) == Some(DOWN)))
            && nodes[3..].iter().all(|n| [1, 2, 3].iter().all(|id| state_of(n, *id) == Some(DOWN)))
    })
    .await;
    println!("partition detected in {took:?} (virtual)");
    assert!(all_see(&refs(&nodes[..3]), &[1, 2, 3], ALIVE));
    assert!(all_see(&refs(&nodes[3..]), &[4, 5], ALIVE));

    net.heal();
    // Healing needs one packet to cross: foca's courtesy `TurnUndead` to a
    // member it declares down, or its announce to down members (every 65 s
    // in the LAN preset). The member that learns it is down renews its bump
    // and rejoins, and the others follow. Allow two announce rounds.
    let took = wait_for(Duration::from_secs(150), "all alive after healing", || {
        all_see(&refs(&nodes), &ids, ALIVE)
    })
    .await;
    println!("healed in {took:?} (virtual)");
}

#[tokio::test(start_paused = true)]
async fn bad_packets_are_dropped_and_counted_and_the_node_keeps_working() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let secret = b"a cluster secret for the tests".to_vec();
    let nodes = start_cluster(&net, seed, &[1, 2], Some(&secret), None).await;
    wait_for(Duration::from_secs(10), "joined", || all_see(&refs(&nodes), &[1, 2], ALIVE)).await;

    let target = gossip_addr(1);
    let attacker = gossip_addr(99);
    let real = net
        .recent_packets()
        .into_iter()
        .rev()
        .find(|d| d.to == target)
        .expect("node 1 received packets")
        .bytes;
    let right = PacketAuth::new(&secret);
    let payload = right.open(&real).expect("a real packet opens");
    let payload = payload.as_slice();
    let wrong = PacketAuth::new(b"not the cluster secret at all");
    let sealed = |auth: &PacketAuth, bytes: &[u8]| {
        let mut packet = bytes.to_vec();
        auth.seal(&mut packet);
        packet
    };
    let garbage: Vec<u8> =
        (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();

    let before = nodes[0].metrics();
    let inject = |bytes: Vec<u8>| net.inject(attacker, target, bytes);
    // Authentication failures: shorter than a tag, truncated, wrong key, garbage.
    inject(vec![1, 2, 3]);
    inject(real[..real.len() - 5].to_vec());
    inject(sealed(&wrong, payload));
    inject(garbage.clone());
    // Size: one byte over the limit, even if correctly sealed.
    inject(sealed(
        &right,
        &vec![0u8; GOSSIP_PACKET_BYTES_MAX + 1 - calmkv_gossip::auth::SEAL_BYTES],
    ));
    // Authenticated but undecodable: garbage, a truncated real payload, empty.
    inject(sealed(&right, &garbage));
    inject(sealed(&right, &payload[..payload.len() / 2]));
    inject(sealed(&right, &[]));

    wait_for(Duration::from_secs(1), "bad packets counted", || {
        let m = nodes[0].metrics();
        m.dropped_auth - before.dropped_auth == 4
            && m.dropped_size - before.dropped_size == 1
            && m.decode_errors - before.decode_errors == 3
    })
    .await;

    // Still working: a third node joins and everyone sees everyone.
    let mut config = config(3, seed, &[1]);
    config.cluster_secret = Some(secret.clone());
    let third = start(&net, config).await;
    let all = [&nodes[0], &nodes[1], &third];
    wait_for(Duration::from_secs(10), "third node joined", || all_see(&all, &[1, 2, 3], ALIVE))
        .await;

    // A node without the secret hears only noise and is never admitted.
    let outsider = start(&net, common::config(4, seed, &[1])).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(nodes[0].member(4).is_none());
    assert!(outsider.members().iter().all(|m| m.state != ALIVE));
    assert!(nodes[0].metrics().dropped_auth - before.dropped_auth > 4);
}

#[tokio::test(start_paused = true)]
async fn garbage_without_a_secret_is_a_decode_error() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let node = start(&net, config(1, seed, &[])).await;
    let from = gossip_addr(99);
    net.inject(from, gossip_addr(1), vec![]);
    net.inject(from, gossip_addr(1), vec![calmkv_gossip::codec::WIRE_VERSION, 0x93, 0xff]);
    net.inject(from, gossip_addr(1), b"GET / HTTP/1.1\r\n\r\n".to_vec());
    net.inject(from, gossip_addr(1), vec![0x55; GOSSIP_PACKET_BYTES_MAX]);
    net.inject(from, gossip_addr(1), vec![0x55; 64 * 1024]);
    wait_for(Duration::from_secs(1), "counted", || {
        let m = node.metrics();
        m.decode_errors == 4 && m.dropped_size == 1
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn lossy_network_still_converges() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    net.set_loss(0.1);
    let ids = [1, 2, 3, 4];
    let nodes = start_cluster(&net, seed, &ids, None, None).await;
    wait_for(Duration::from_secs(20), "all alive despite 10% loss", || {
        all_see(&refs(&nodes), &ids, ALIVE)
    })
    .await;
    // Half a minute of probing under loss: indirect probes and refutation
    // keep members alive; whatever was disturbed recovers once loss stops.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let stats = net.stats();
    println!("network {stats:?}");
    assert!(stats.dropped_loss > 0);
    net.set_loss(0.0);
    wait_for(Duration::from_secs(150), "all alive after the loss stops", || {
        all_see(&refs(&nodes), &ids, ALIVE)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn metadata_update_reaches_the_cluster() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let ids = [1, 2, 3];
    let nodes = start_cluster(&net, seed, &ids, None, None).await;
    wait_for(Duration::from_secs(10), "all alive", || all_see(&refs(&nodes), &ids, ALIVE)).await;

    let mut new_meta = meta(2);
    new_meta.invariants_hash = 0xbeef;
    let new = nodes[1].update_meta(new_meta).await.unwrap();
    assert_eq!(new.bump, nodes[1].identity().bump);
    wait_for(Duration::from_secs(3), "new metadata everywhere", || {
        [&nodes[0], &nodes[2]]
            .iter()
            .all(|n| n.member(2).is_some_and(|m| m.identity == new && m.state == ALIVE))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn bump_grows_past_the_persisted_one_and_is_written_at_once() {
    let seed = test_seed();
    let net = MemNetwork::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path(), 1);
    // A bump far beyond the wall clock, so only the file can explain the next one.
    let persisted = calmkv_gossip::state_file::PersistedState {
        node_id: 1,
        bump: u64::MAX / 2,
        members: vec![],
    };
    calmkv_gossip::state_file::store(&path, &persisted).unwrap();
    let mut c = config(1, seed, &[]);
    c.state_path = Some(path.clone());
    let node = start(&net, c.clone()).await;
    assert_eq!(node.identity().bump, u64::MAX / 2 + 1);
    // Written before the node said anything, so a crash now still advances it.
    let on_disk = calmkv_gossip::state_file::load(&path).unwrap().unwrap();
    assert_eq!(on_disk.bump, u64::MAX / 2 + 1);
    node.abort();
    let node = start(&net, c.clone()).await;
    assert_eq!(node.identity().bump, u64::MAX / 2 + 2);
    node.shutdown().await.unwrap();

    // A state file of another node is refused.
    c.node_id = 2;
    let err = Membership::start(c, net.bind(gossip_addr(2))).await.unwrap_err();
    assert!(
        matches!(err, calmkv_gossip::GossipError::StateOfAnotherNode { file_node_id: 1, .. }),
        "{err}"
    );
}
