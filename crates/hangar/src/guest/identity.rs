//! A new identity for a guest started from a snapshot: the host makes it
//! (random machine-id and entropy, its own clock) and the agent applies it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hangar_proto::{
    FrameKind, GuestFacts, GuestIdentity, GuestMessage, GuestResources, HostMessage,
};

use super::{AgentClient, Check, GuestError};

/// How many random bytes a guest's pool gets.
const ENTROPY_BYTES: usize = 64;

/// A fresh identity: `hostname` and `mac` from the caller, the rest random
/// or the host's clock.
pub fn new_identity(hostname: &str, mac: Option<String>) -> std::io::Result<GuestIdentity> {
    let mut machine_id = [0u8; 16];
    let mut entropy = [0u8; ENTROPY_BYTES];
    getrandom::getrandom(&mut machine_id).map_err(std::io::Error::other)?;
    getrandom::getrandom(&mut entropy).map_err(std::io::Error::other)?;
    let clock_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Ok(GuestIdentity {
        hostname: hostname.to_owned(),
        machine_id: hex::encode(machine_id),
        mac,
        entropy: hex::encode(entropy),
        clock_unix_ns,
        cpus: None,
        memory_mib: None,
    })
}

/// What the agent reported after applying an identity.
#[derive(Clone, Debug)]
pub struct IdentityApplied {
    /// Parts that failed in the guest (empty when all worked).
    pub errors: Vec<String>,
    pub facts: GuestFacts,
    /// What is online, when the identity asked for vCPUs or memory and
    /// the agent can grow a guest.
    pub resources: Option<GuestResources>,
}

impl AgentClient {
    /// Sends `identity` and waits (at most `timeout`) for the agent's report.
    pub fn set_identity(
        &mut self,
        identity: GuestIdentity,
        timeout: Duration,
        check: Check<'_>,
    ) -> Result<IdentityApplied, GuestError> {
        let id = self.allocate_id();
        self.send(&HostMessage::SetIdentity { id, identity })?;
        let started = Instant::now();
        loop {
            if let Some(frame) = self.next_frame()? {
                if frame.kind == FrameKind::Guest {
                    if let Ok(GuestMessage::IdentitySet {
                        id: got,
                        errors,
                        facts,
                        resources,
                    }) = GuestMessage::from_frame(&frame)
                    {
                        if got == id {
                            self.facts = facts.clone();
                            return Ok(IdentityApplied {
                                errors,
                                facts,
                                resources,
                            });
                        }
                    }
                }
            }
            if started.elapsed() >= timeout {
                return Err(GuestError::Timeout {
                    waited: started.elapsed(),
                });
            }
            check().map_err(|reason| GuestError::Aborted { reason })?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_fresh_each_time() {
        let a = new_identity("a", None).unwrap();
        let b = new_identity("a", None).unwrap();
        assert_eq!(a.machine_id.len(), 32);
        assert_ne!(a.machine_id, b.machine_id);
        assert_ne!(a.entropy, b.entropy);
        assert!(
            !format!("{a:?}").contains(&a.entropy),
            "entropy is never printed"
        );
    }
}
