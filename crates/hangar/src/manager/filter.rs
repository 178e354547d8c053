//! Which VMs `ps` shows: by namespace, state and labels.

use std::collections::BTreeMap;

use crate::record::{VmRecord, VmState, VmSummary};

/// All conditions must hold. Empty lists match everything.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Include VMs without a running VMM (`ps -a`).
    pub all: bool,
    pub namespace: Option<String>,
    /// Any of these states (implies `all`).
    pub states: Vec<VmState>,
    /// Each `key` must exist; when a value is given it must match.
    pub labels: BTreeMap<String, Option<String>>,
}

impl ListFilter {
    pub fn matches(&self, record: &VmRecord) -> bool {
        self.matches_parts(record.state, &record.namespace, &record.spec.labels)
    }

    pub fn matches_summary(&self, summary: &VmSummary) -> bool {
        self.matches_parts(summary.state, &summary.namespace, &summary.labels)
    }

    fn matches_parts(
        &self,
        state: VmState,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        let state_ok = if self.states.is_empty() {
            self.all || state.has_process()
        } else {
            self.states.contains(&state)
        };
        let label_ok = |(key, want): (&String, &Option<String>)| match (labels.get(key), want) {
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => true,
            (None, _) => false,
        };
        state_ok
            && self.namespace.as_deref().is_none_or(|ns| namespace == ns)
            && self.labels.iter().all(label_ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::BackendKind;
    use crate::spec::VmSpec;

    fn vm(state: VmState, ns: &str, labels: &[(&str, &str)]) -> VmRecord {
        let mut spec = VmSpec::new("x");
        spec.namespace = ns.into();
        spec.labels = labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let mut record = VmRecord::new("0".into(), spec, BackendKind::Noop, "/x".into());
        record.state = state;
        record
    }

    #[test]
    fn default_shows_running_only_and_all_shows_the_rest() {
        let stopped = vm(VmState::Stopped, "default", &[]);
        let running = vm(VmState::Running, "default", &[]);
        let filter = ListFilter::default();
        assert!(filter.matches(&running) && !filter.matches(&stopped));
        let all = ListFilter {
            all: true,
            ..Default::default()
        };
        assert!(all.matches(&stopped));
    }

    #[test]
    fn namespace_state_and_labels_narrow_the_list() {
        let web = vm(VmState::Running, "stack", &[("role", "web"), ("tier", "1")]);
        let mut filter = ListFilter {
            namespace: Some("stack".into()),
            states: vec![VmState::Running, VmState::Paused],
            ..Default::default()
        };
        filter.labels.insert("role".into(), Some("web".into()));
        filter.labels.insert("tier".into(), None);
        assert!(filter.matches(&web));
        filter.labels.insert("role".into(), Some("db".into()));
        assert!(!filter.matches(&web));
        let other_ns = ListFilter {
            namespace: Some("default".into()),
            ..Default::default()
        };
        assert!(!other_ns.matches(&web));
    }
}
