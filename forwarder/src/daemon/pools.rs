//! The pools of both planes under one name space, and the one way to change them.
//!
//! A request names a pool — an L4 VIP or a vhost, one name space — and a server. The name is
//! resolved once to the model that owns it ([`Plane`]); the verb ([`Verb`]) is then applied
//! to a copy of that model through [`PoolVerbs`], which both models implement, and the copy
//! goes through the daemon's transaction (`Inner::commit`: maps, state file, commit, undo on
//! failure). Operators' changes and health transitions take this same path.

use std::net::SocketAddr;

use weir_config::control::{AdminState, ControlError, ControlErrorKind, HealthState, Response};

use super::{Inner, refusal, vhost_refusal};
use crate::{l4::L4Services, vhosts::Vhosts};

/// The model a pool name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plane {
    L4,
    L7,
}

/// A change to one server of a pool.
#[derive(Debug, Clone, Copy)]
pub(super) enum Verb {
    Add { weight: u32 },
    SetState(AdminState),
    SetWeight(u32),
    SetHealth(HealthState),
    Remove,
}

/// The verbs, as both models implement them; refusals become control errors that say which
/// pool and server.
pub(super) trait PoolVerbs: Clone {
    fn change_server(
        &mut self,
        pool: &str,
        address: SocketAddr,
        verb: Verb,
    ) -> Result<(), ControlError>;
}

/// Implements [`PoolVerbs`] for a model whose inherent methods have the verbs' names; the
/// models differ only in their error type, which `$refusal` maps.
macro_rules! pool_verbs {
    ($model:ty, $refusal:path) => {
        impl PoolVerbs for $model {
            fn change_server(
                &mut self,
                pool: &str,
                address: SocketAddr,
                verb: Verb,
            ) -> Result<(), ControlError> {
                match verb {
                    Verb::Add { weight } => self.add_server(pool, address, weight),
                    Verb::SetState(state) => self.set_state(pool, address, state),
                    Verb::SetWeight(weight) => self.set_weight(pool, address, weight),
                    Verb::SetHealth(health) => self.set_health(pool, address, health),
                    Verb::Remove => self.remove_server(pool, address),
                }
                .map_err($refusal)
            }
        }
    };
}

pool_verbs!(L4Services, refusal);
pool_verbs!(Vhosts, vhost_refusal);

impl Inner {
    /// Which plane pool `name` is on. An unknown name is refused with the names there are.
    pub(super) fn resolve(&self, name: &str) -> Result<Plane, ControlError> {
        if self.vhosts.contains(name) {
            return Ok(Plane::L7);
        }
        if self.l4.service(name).is_ok() {
            return Ok(Plane::L4);
        }
        let list = |names: Vec<&str>| {
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        Err(ControlError::new(
            ControlErrorKind::NotFound,
            format!(
                "no L4 VIP or vhost named `{name}` (L4 VIPs: {}; vhosts: {})",
                list(self.l4.services().map(|s| s.name.as_str()).collect()),
                list(self.vhosts.iter().map(|v| v.name.as_str()).collect()),
            ),
        ))
    }

    /// Applies `verb` to server `address` of pool `name`, on a copy of its model that then goes
    /// through the transaction.
    pub(super) fn edit(
        &mut self,
        name: &str,
        address: SocketAddr,
        verb: Verb,
    ) -> Result<Response, ControlError> {
        let changes = match self.resolve(name)? {
            Plane::L4 => {
                let mut next = self.l4.clone();
                next.change_server(name, address, verb)?;
                self.commit(next, self.vhosts.clone(), None)?
            }
            Plane::L7 => {
                let mut next = self.vhosts.clone();
                next.change_server(name, address, verb)?;
                self.commit(self.l4.clone(), next, None)?
            }
        };
        Ok(Response::Changed(changes))
    }
}
