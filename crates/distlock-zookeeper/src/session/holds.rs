//! A held node, watched until it is deleted: by someone else (a forced
//! release), the session is asked to renew at once, and the renewal's
//! check reports the key lost; by the session's own release, nothing.
//!
//! The watch is set by a task after the grant, so the acquire waits for no
//! more round trips than before. The periodic renewal checks every held
//! node in any case; the watch only makes the news come sooner.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use zookeeper_client::EventType;

use super::{Node, Shared};
use crate::CALL_TIMEOUT;

/// Watches `node` of the session `shared` until it goes. Holds neither the
/// session nor its client while it waits: a session dropped or frozen lets
/// its connection go, and its watches end with it.
pub(super) fn watch_held(shared: &Arc<Shared>, node: &Node) {
    let shared = Arc::downgrade(shared);
    let (path, released) = (node.path.clone(), Arc::clone(&node.released));
    tokio::spawn(async move {
        loop {
            let Some(client) = Weak::upgrade(&shared).and_then(|shared| shared.client()) else {
                return;
            };
            let watched =
                tokio::time::timeout(CALL_TIMEOUT, client.check_and_watch_stat(&path)).await;
            drop(client);
            match watched {
                Ok(Ok((Some(_), watcher))) => {
                    let event = watcher.changed().await;
                    match event.event_type {
                        EventType::NodeDeleted => {}
                        // The session closed or expired: its renewal, if
                        // any, finds out.
                        EventType::Session => return,
                        // Not something the store does to its nodes, but
                        // the watch is spent: set it again.
                        _ => continue,
                    }
                }
                // Gone already.
                Ok(Ok((None, _))) => {}
                // Not answered: the periodic renewal checks the node.
                Ok(Err(_)) | Err(_) => return,
            }
            if !released.load(Ordering::SeqCst) {
                if let Some(shared) = shared.upgrade() {
                    tracing::debug!(path, "a held node was deleted by someone else");
                    shared.renewal_wanted.notify_one();
                }
            }
            return;
        }
    });
}
