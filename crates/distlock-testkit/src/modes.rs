//! FIFO order, shared locks and semaphores.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::sleep;

use super::{with_waiters, Kit, Outcome, PATIENCE, SETTLE};

/// Waiters are granted in the order they arrived.
pub async fn fifo_order(kit: Kit) -> Outcome {
    require!(kit.caps().fair, "store does not claim FIFO order");
    let key = kit.key("fifo");
    let owner = kit.session().await;
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for place in 0..4 {
        let session = kit.session().await;
        let (key, order) = (key.clone(), Arc::clone(&order));
        waiters.push(tokio::spawn(async move {
            let guard = session
                .lock(&key)
                .wait(PATIENCE)
                .await
                .expect("queued waiter");
            order.lock().expect("order list").push(place);
            guard.release().await.expect("release");
        }));
        sleep(SETTLE).await;
    }
    held.release().await.expect("release");
    for waiter in waiters {
        waiter.await.expect("waiter task");
    }
    assert_eq!(*order.lock().expect("order list"), vec![0, 1, 2, 3]);
    Outcome::Passed
}

/// Readers hold a shared lock together, each with its own token.
pub async fn shared_admits_readers_together(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let key = kit.key("readers");
    let mut guards = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let session = kit.session().await;
        let guard = session
            .read(&key)
            .try_lock()
            .await
            .expect("try")
            .expect("reader admitted");
        sessions.push(session);
        guards.push(guard);
    }
    let mut tokens: Vec<u64> = guards.iter().map(|g| g.token()).collect();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "each reader has its own token");
    Outcome::Passed
}

/// Readers exclude writers and a writer excludes readers.
pub async fn shared_excludes_writers(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let key = kit.key("rw");
    let (a, b) = (kit.session().await, kit.session().await);
    let read = a.read(&key).wait(PATIENCE).await.expect("read");
    assert!(
        b.write(&key).try_lock().await.expect("try").is_none(),
        "writer beside a reader"
    );
    read.release().await.expect("release read");
    let write = b.write(&key).wait(PATIENCE).await.expect("write");
    assert!(
        a.read(&key).try_lock().await.expect("try").is_none(),
        "reader beside a writer"
    );
    assert!(
        a.lock(&key).try_lock().await.expect("try").is_none(),
        "two writers"
    );
    write.release().await.expect("release write");
    Outcome::Passed
}

/// A reader arriving after a waiting writer waits behind it.
pub async fn writers_are_preferred(kit: Kit) -> Outcome {
    require!(
        kit.caps().writer_preferring,
        "store does not claim writer preference"
    );
    let key = kit.key("prefer");
    let (reader, writer, late) = (
        kit.session().await,
        kit.session().await,
        kit.session().await,
    );
    let read = reader.read(&key).wait(PATIENCE).await.expect("read");
    let write_key = key.clone();
    let waiting_writer = tokio::spawn(async move {
        let guard = writer
            .write(&write_key)
            .wait(PATIENCE)
            .await
            .expect("writer");
        let token = guard.token();
        guard.release().await.expect("release write");
        token
    });
    sleep(SETTLE).await;
    assert!(
        late.read(&key).try_lock().await.expect("try").is_none(),
        "reader overtook a writer"
    );
    read.release().await.expect("release read");
    let write_token = waiting_writer.await.expect("writer task");
    assert!(write_token > 0);
    Outcome::Passed
}

/// Readers queued behind a writer all enter once it leaves, together: a
/// reader waits for the writers ahead of it, never for a reader.
pub async fn readers_behind_a_writer_enter_together(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let key = kit.key("behind");
    let writer = kit.session().await;
    let write = writer.write(&key).wait(PATIENCE).await.expect("write");
    let mut readers = Vec::new();
    for _ in 0..2 {
        let session = kit.session().await;
        let key = key.clone();
        readers.push(tokio::spawn(async move {
            let guard = session.read(&key).wait(PATIENCE).await;
            (session, guard)
        }));
        sleep(SETTLE).await;
    }
    if kit.caps().status && kit.caps().fair {
        // A store that queues shows its waiters: both are behind the writer.
        with_waiters(kit.client(), &key, 2).await;
    }
    write.release().await.expect("release write");
    // Each reader keeps its hold: the second is granted while the first
    // still holds, or not at all.
    let mut held = Vec::new();
    for reader in readers {
        let (session, guard) = reader.await.expect("reader task");
        let guard = guard.expect("a reader behind a writer enters beside the other reader");
        held.push((session, guard));
    }
    assert_ne!(held[0].1.token(), held[1].1.token(), "tokens of their own");
    for (_, guard) in held {
        guard.release().await.expect("release read");
    }
    Outcome::Passed
}

/// A semaphore of N admits N holders together, never more.
pub async fn semaphore_admits_exactly_n(kit: Kit) -> Outcome {
    require!(kit.caps().semaphore, "store has no semaphores");
    const PERMITS: u32 = 3;
    let key = kit.key("sem");
    let mut sessions = Vec::new();
    for _ in 0..=PERMITS {
        sessions.push(kit.session().await);
    }
    let mut guards = Vec::new();
    for session in &sessions[..PERMITS as usize] {
        let guard = session
            .semaphore(&key, PERMITS)
            .try_lock()
            .await
            .expect("try");
        guards.push(guard.expect("a permit is free"));
    }
    let extra = &sessions[PERMITS as usize];
    assert!(
        extra
            .semaphore(&key, PERMITS)
            .try_lock()
            .await
            .expect("try")
            .is_none(),
        "N+1 admitted"
    );
    guards
        .pop()
        .expect("a guard")
        .release()
        .await
        .expect("release a permit");
    let guard = extra
        .semaphore(&key, PERMITS)
        .wait(PATIENCE)
        .await
        .expect("freed permit");
    guards.push(guard);
    drop(guards);

    // Under contention, never more than N inside.
    let inside = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let session = kit.session().await;
        let (key, inside, most) = (key.clone(), Arc::clone(&inside), Arc::clone(&most));
        tasks.push(tokio::spawn(async move {
            for _ in 0..8 {
                let guard = session
                    .semaphore(&key, PERMITS)
                    .wait(PATIENCE)
                    .await
                    .expect("permit");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("semaphore task");
    }
    assert!(
        most.load(Ordering::SeqCst) <= PERMITS,
        "{} inside",
        most.load(Ordering::SeqCst)
    );
    Outcome::Passed
}
