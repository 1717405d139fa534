//! An in-memory DNS provider: the unit tests' stand-in for a DNS service.

use std::sync::Mutex;

use super::{Changes, DnsError, DnsErrorKind, DnsProvider, Record};

/// Zones held in memory.
#[derive(Default)]
pub struct InMemory {
    zones: Mutex<Vec<(String, Vec<Record>)>>,
    /// Calls to `apply`, for assertions.
    pub applied: Mutex<Vec<Changes>>,
}

impl InMemory {
    /// A provider holding `zone` with `records`.
    pub fn with_zone(zone: &str, records: Vec<Record>) -> Self {
        let me = Self::default();
        me.zones
            .lock()
            .unwrap()
            .push((super::normalize_name(zone), records));
        me
    }

    /// Every record of `zone`.
    pub fn all(&self, zone: &str) -> Vec<Record> {
        let zones = self.zones.lock().unwrap();
        zones
            .iter()
            .find(|(z, _)| z == &super::normalize_name(zone))
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl DnsProvider for InMemory {
    fn name(&self) -> &'static str {
        "inmemory"
    }

    async fn records(&self, zone: &str, name: &str) -> Result<Vec<Record>, DnsError> {
        let zones = self.zones.lock().unwrap();
        let (_, records) = zones
            .iter()
            .find(|(z, _)| z == &super::normalize_name(zone))
            .ok_or_else(|| {
                DnsError::new("inmemory", DnsErrorKind::ZoneNotFound, zone.to_string())
            })?;
        let name = super::normalize_name(name);
        Ok(records.iter().filter(|r| r.name == name).cloned().collect())
    }

    async fn apply(&self, zone: &str, changes: &Changes) -> Result<(), DnsError> {
        let mut zones = self.zones.lock().unwrap();
        let (_, records) = zones
            .iter_mut()
            .find(|(z, _)| z == &super::normalize_name(zone))
            .ok_or_else(|| {
                DnsError::new("inmemory", DnsErrorKind::ZoneNotFound, zone.to_string())
            })?;
        records.retain(|r| !changes.remove.iter().any(|x| x.same(r)));
        for a in &changes.add {
            if !records.iter().any(|r| r.same(a)) {
                records.push(a.clone());
            }
        }
        self.applied.lock().unwrap().push(changes.clone());
        Ok(())
    }
}
