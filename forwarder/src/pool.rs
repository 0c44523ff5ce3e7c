//! What L4 VIPs and L7 virtual hosts share as pools of servers: the three-way merge of a
//! config file's pool with the changes operators made at run time, and the change lines
//! operators read.

use std::{net::SocketAddr, time::Instant};

use weir_config::{
    AllDown, ServerSpec,
    control::{AdminState, HealthState},
};

/// Which servers of a pool take new traffic: admin-ready and not unhealthy. When none is
/// healthy, `fail_open` lets every admin-ready server take it (health is ignored rather
/// than the pool emptied); `refuse` leaves the pool empty.
pub fn in_rotation(servers: &[(AdminState, HealthState)], all_down: AllDown) -> Vec<usize> {
    let ready: Vec<usize> = (0..servers.len())
        .filter(|&i| servers[i].0 == AdminState::Ready)
        .collect();
    let healthy: Vec<usize> = ready
        .iter()
        .copied()
        .filter(|&i| servers[i].1.is_up())
        .collect();
    if healthy.is_empty() && all_down == AllDown::FailOpen {
        ready
    } else {
        healthy
    }
}

/// Whether a server with this admin state and health may take new traffic (before the
/// all-down policy): entering this is what starts a slow start.
fn eligible(state: AdminState, health: HealthState) -> bool {
    state == AdminState::Ready && health.is_up()
}

/// A server's weight `since` it entered the rotation, over a slow start of `period_ms`: a
/// straight ramp from 1 to `weight`, full weight once the period is over (or without one).
pub fn ramped_weight(weight: u32, since: Option<Instant>, period_ms: u64, now: Instant) -> u32 {
    let Some(since) = since else { return weight };
    let elapsed = now.saturating_duration_since(since).as_millis() as u64;
    if period_ms == 0 || elapsed >= period_ms {
        return weight;
    }
    ((u64::from(weight) * elapsed).div_ceil(period_ms) as u32).clamp(1, weight)
}

/// Whether a slow start begun `since` is still under way at `now`.
pub fn ramping(since: Option<Instant>, period_ms: u64, now: Instant) -> bool {
    since.is_some_and(|since| (now.saturating_duration_since(since).as_millis() as u64) < period_ms)
}

/// The health a server starts with: checked pools start their servers up (and take them
/// down after `fall` failures), unchecked pools never change it.
pub fn initial_health(checked: bool) -> HealthState {
    if checked {
        HealthState::Healthy
    } else {
        HealthState::Unchecked
    }
}

/// The edits a pool model offers, so one merge serves L4 and L7.
pub trait PoolEdit {
    type Error;
    fn has_server(&self, pool: &str, address: SocketAddr) -> Result<bool, Self::Error>;
    fn add_server(
        &mut self,
        pool: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), Self::Error>;
    fn set_weight(
        &mut self,
        pool: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), Self::Error>;
    fn remove_server(&mut self, pool: &str, address: SocketAddr) -> Result<(), Self::Error>;
}

/// Applies to the running pool `pool` what the config's pool changed from `base` (as last
/// applied) to `new`: servers added or reweighted in the file are added or reweighted;
/// servers taken out of the file are removed. Everything else operators did at run time
/// (servers they added or removed, drains, weights of servers the file did not touch) is
/// kept.
pub fn merge_config_pool<P: PoolEdit>(
    model: &mut P,
    pool: &str,
    base: &[ServerSpec],
    new: &[ServerSpec],
) -> Result<(), P::Error> {
    let in_base = |a: SocketAddr| base.iter().find(|s| s.address == a);
    for spec in new {
        let running = model.has_server(pool, spec.address)?;
        match (in_base(spec.address), running) {
            (None, false) => model.add_server(pool, spec.address, spec.weight)?,
            (None, true) => model.set_weight(pool, spec.address, spec.weight)?,
            (Some(old), true) if old.weight != spec.weight => {
                model.set_weight(pool, spec.address, spec.weight)?
            }
            // Unchanged in the file, or removed at run time since: leave it.
            _ => {}
        }
    }
    for spec in base {
        let still_wanted = new.iter().any(|s| s.address == spec.address);
        if !still_wanted && model.has_server(pool, spec.address)? {
            model.remove_server(pool, spec.address)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdminState::*;
    use HealthState::*;

    #[test]
    fn slow_start_ramps_from_one_to_the_full_weight() {
        let start = Instant::now();
        let at = |ms| start + std::time::Duration::from_millis(ms);
        assert_eq!(ramped_weight(100, Some(start), 10_000, at(0)), 1);
        assert_eq!(ramped_weight(100, Some(start), 10_000, at(2_500)), 25);
        assert_eq!(ramped_weight(100, Some(start), 10_000, at(9_999)), 100);
        assert_eq!(ramped_weight(100, Some(start), 10_000, at(20_000)), 100);
        assert_eq!(ramped_weight(100, None, 10_000, at(0)), 100);
        assert_eq!(ramped_weight(100, Some(start), 0, at(0)), 100);
        assert!(
            ramping(Some(start), 10_000, at(9_000)) && !ramping(Some(start), 10_000, at(10_000))
        );
    }

    #[test]
    fn admin_state_wins_and_all_down_follows_the_policy() {
        let pool = [
            (Ready, Healthy),
            (Disabled, Healthy),
            (Ready, Unhealthy),
            (Draining, Unhealthy),
        ];
        assert_eq!(in_rotation(&pool, AllDown::Refuse), vec![0]);
        let down = [
            (Ready, Unhealthy),
            (Disabled, Unhealthy),
            (Ready, Unhealthy),
        ];
        assert_eq!(in_rotation(&down, AllDown::Refuse), Vec::<usize>::new());
        // Fail open takes the admin-ready ones, never a disabled one.
        assert_eq!(in_rotation(&down, AllDown::FailOpen), vec![0, 2]);
        assert_eq!(in_rotation(&[(Ready, Unchecked)], AllDown::Refuse), vec![0]);
    }
}

/// A server in a pool, as the control plane keeps it for L4 VIPs and L7 vhosts alike. `Id` is
/// the data plane's name for it: the index in the L4 datapath's server array; L7 needs none
/// (its snapshot is rebuilt on every change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server<Id = ()> {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// As health checks see it; runtime only (a restarted daemon checks again).
    pub health: HealthState,
    /// When it last entered the rotation, for slow start; runtime only.
    pub ramp_since: Option<Instant>,
    pub id: Id,
}

impl<Id> Server<Id> {
    /// A server operators just added: ready, ramping up from now, with the health a fresh
    /// server of its pool starts with.
    pub fn added(address: SocketAddr, weight: u32, checked: bool, id: Id) -> Server<Id> {
        Server {
            address,
            weight,
            state: AdminState::Ready,
            health: initial_health(checked),
            ramp_since: Some(Instant::now()),
            id,
        }
    }

    /// A server as a previous daemon left it: its admin state kept, its health checked
    /// again, no slow start (it was serving).
    pub fn restored(
        address: SocketAddr,
        weight: u32,
        state: AdminState,
        checked: bool,
        id: Id,
    ) -> Server<Id> {
        Server {
            address,
            weight,
            state,
            health: initial_health(checked),
            ramp_since: None,
            id,
        }
    }

    /// Applies `apply`; a server that enters the rotation by it starts its slow start.
    pub fn change(&mut self, apply: impl FnOnce(&mut Self)) {
        let was = eligible(self.state, self.health);
        apply(self);
        if !was && eligible(self.state, self.health) {
            self.ramp_since = Some(Instant::now());
        }
    }

    /// Takes over what `before`, this server in the model being replaced, knew at run time:
    /// its health (when the pool is `checked` and it had been checked) and its slow start.
    /// A reload must not forget that a server is down.
    pub fn carry_runtime<Old>(&mut self, before: &Server<Old>, checked: bool) {
        if checked && before.health != HealthState::Unchecked {
            self.health = before.health;
        }
        self.ramp_since = self.ramp_since.or(before.ramp_since);
    }

    pub fn line(&self) -> ServerLine {
        ServerLine {
            address: self.address,
            weight: self.weight,
            state: self.state,
            health: self.health,
        }
    }
}

/// Where the server `address` is in `servers`.
pub fn position<Id>(servers: &[Server<Id>], address: SocketAddr) -> Option<usize> {
    servers.iter().position(|s| s.address == address)
}

/// A server as change lines describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLine {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    pub health: HealthState,
}

/// The lower-case name operators see for a health state.
pub fn health_name(health: HealthState) -> &'static str {
    match health {
        HealthState::Unchecked => "unchecked",
        HealthState::Healthy => "healthy",
        HealthState::Unhealthy => "unhealthy",
    }
}

/// One line per server added, removed, reweighted or changed state, from `old` to `new`
/// (`kind` and `name` say which pool: `vip web`, `vhost shop`).
pub fn server_changes(
    kind: &str,
    name: &str,
    old: &[ServerLine],
    new: &[ServerLine],
) -> Vec<String> {
    let mut lines = Vec::new();
    for server in old {
        if !new.iter().any(|s| s.address == server.address) {
            lines.push(format!("{kind} {name}: server {} removed", server.address));
        }
    }
    for server in new {
        match old.iter().find(|s| s.address == server.address) {
            None => lines.push(format!(
                "{kind} {name}: server {} added (weight {}, {})",
                server.address,
                server.weight,
                server.state.name()
            )),
            Some(before) => {
                if before.weight != server.weight {
                    lines.push(format!(
                        "{kind} {name}: server {} weight {} -> {}",
                        server.address, before.weight, server.weight
                    ));
                }
                if before.state != server.state {
                    lines.push(format!(
                        "{kind} {name}: server {} {} -> {}",
                        server.address,
                        before.state.name(),
                        server.state.name()
                    ));
                }
                if before.health != server.health {
                    lines.push(format!(
                        "{kind} {name}: server {} {} -> {}",
                        server.address,
                        health_name(before.health),
                        health_name(server.health)
                    ));
                }
            }
        }
    }
    lines
}
