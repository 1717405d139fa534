//! Ownership of records, kept in DNS beside them (external-dns' TXT registry, per record).
//!
//! For each record the operator creates at NAME, a TXT record at `_backupmx.NAME` says so:
//!
//! ```text
//! _backupmx.example.com. TXT "heritage=backupmx,v=1,owner=mail/example,type=MX,data=20 mx2.example.com."
//! ```
//!
//! The format is versioned (`v=1`) from the start. A record without such a claim was made by
//! someone else (the primary's MX, a record made by hand) and is never changed or deleted; a
//! claim naming another owner protects the record from this one.

use super::{RData, Record, RecordType};

/// Label prefixed to a record's name to hold its ownership TXT records.
pub const PREFIX: &str = "_backupmx";
const HERITAGE: &str = "heritage=backupmx";

/// One ownership claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `namespace/name` of the BackupMx.
    pub owner: String,
    pub rtype: RecordType,
    pub data: RData,
}

/// Where the claims of records at `name` live.
pub fn claim_name(name: &str) -> String {
    format!("{PREFIX}.{name}")
}

/// The TXT value claiming `record` for `owner`.
pub fn claim_value(owner: &str, record: &Record) -> String {
    format!(
        "{HERITAGE},v=1,owner={owner},type={},data={}",
        record.record_type().as_str(),
        record.data.presentation()
    )
}

/// The TXT record claiming `record` for `owner`.
pub fn claim_record(owner: &str, record: &Record) -> Record {
    Record::new(
        &claim_name(&record.name),
        record.ttl,
        RData::Txt(claim_value(owner, record)),
    )
}

/// Parses a claim; `None` for any other TXT value.
pub fn parse(txt: &str) -> Option<Claim> {
    let rest = txt.strip_prefix(HERITAGE)?.strip_prefix(',')?;
    let mut owner = None;
    let mut rtype = None;
    let mut data = None;
    let mut version = None;
    for (i, part) in rest.splitn(4, ',').enumerate() {
        let (k, v) = part.split_once('=')?;
        match (i, k) {
            (0, "v") => version = Some(v),
            (1, "owner") => owner = Some(v),
            (2, "type") => rtype = RecordType::parse(v),
            (3, "data") => data = Some(v),
            _ => return None,
        }
    }
    if version != Some("1") {
        return None;
    }
    let rtype = rtype?;
    Some(Claim {
        owner: owner?.to_string(),
        rtype,
        data: RData::parse(rtype, data?)?,
    })
}

/// Who claims `record`, given the records found at its claim name.
pub fn owner_of(claims_found: &[Record], record: &Record) -> Option<String> {
    let name = claim_name(&record.name);
    claims_found
        .iter()
        .filter(|r| r.name == name)
        .filter_map(|r| match &r.data {
            RData::Txt(t) => parse(t),
            _ => None,
        })
        .find(|c| c.rtype == record.record_type() && c.data == record.data)
        .map(|c| c.owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_round_trip_and_identify_their_record() {
        let mx = Record::new("example.com", 300, RData::Mx(20, "mx2.example.com".into()));
        let claim = claim_record("mail/example", &mx);
        assert_eq!(claim.name, "_backupmx.example.com");
        let RData::Txt(t) = &claim.data else { panic!() };
        assert_eq!(
            t,
            "heritage=backupmx,v=1,owner=mail/example,type=MX,data=20 mx2.example.com."
        );
        let c = parse(t).unwrap();
        assert_eq!(c.owner, "mail/example");
        assert_eq!(
            owner_of(std::slice::from_ref(&claim), &mx).as_deref(),
            Some("mail/example")
        );
        let other = Record::new("example.com", 300, RData::Mx(10, "mail.example.com".into()));
        assert_eq!(owner_of(&[claim], &other), None);
        assert_eq!(parse("v=spf1 -all"), None);
        assert_eq!(
            parse("heritage=backupmx,v=2,owner=a/b,type=MX,data=1 x."),
            None
        );
    }
}
