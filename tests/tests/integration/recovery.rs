//! Recovery keeps every intact message: a damaged record (its header, its envelope or its body),
//! in an older segment or in the middle of the newest one, costs that message only. The intact
//! ones reach a real Postfix primary; the damaged one's envelope goes to `corrupt/` and its
//! sender gets a DSN; the damage is reported (ERROR log, metrics, `GET /v1/queue`) and its
//! segment kept until `mx-pod queue repair`. A missing segment and a lost or garbled
//! `holds.json` are reported too, and lost holds keep mail held. A filesystem that fills up
//! under load leaves a log that recovers without damage and without losing acknowledged mail.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, Sink, message, send, send_all, seq_of, state_dir, wait_for,
};
use mx_pod::queue::store::{RecordInfo, records};
use serde_json::Value;

const SENDER: &str = "sender@sender.test";

fn segments(queue_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(queue_dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// The message records of a segment, in order (the `k`-th is the `k`-th message sent).
fn messages_in(segment: &Path) -> Vec<RecordInfo> {
    records(segment)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == 1)
        .collect()
}

/// A pod (replay off) holding seqs 0..5 in its first segment and 5..10 in its second, killed
/// with `kill -9`; returns the two segment files. The next start reads the second as the
/// newest segment.
async fn two_segments(pod: &mut MxPod, tag: &str) -> (PathBuf, PathBuf) {
    send_all(pod.smtp, SENDER, tag, 0..5, 3000).await;
    pod.kill9();
    pod.restart().await;
    send_all(pod.smtp, SENDER, tag, 5..10, 3000).await;
    pod.kill9();
    let segs = segments(&pod.queue_dir);
    assert_eq!(segs.len(), 2, "{segs:?}");
    assert_eq!(messages_in(&segs[0]).len(), 5);
    assert_eq!(messages_in(&segs[1]).len(), 5);
    (segs[0].clone(), segs[1].clone())
}

#[derive(Debug, Clone, Copy)]
enum Part {
    /// The record header's `meta_len`: the record's extent is lost.
    Header,
    /// One byte of the envelope (the sender's first letter): parseable, checksum fails.
    Envelope,
    Body,
}

/// Damages one part of a record in place.
fn damage(segment: &Path, r: &RecordInfo, part: Part) {
    let f = fs::OpenOptions::new().write(true).open(segment).unwrap();
    match part {
        Part::Header => f.write_all_at(&[0xff; 4], r.offset + 8).unwrap(),
        Part::Envelope => {
            let meta = fs::read(segment).unwrap()
                [(r.offset + 32) as usize..(r.offset + 32 + r.meta_len) as usize]
                .to_vec();
            let at = meta
                .windows(10)
                .position(|w| w == b"\"sender\":\"")
                .expect("the envelope names its sender")
                + 10;
            assert_eq!(meta[at], b's', "{}", String::from_utf8_lossy(&meta));
            // sender@ becomes tender@: still JSON, wrong checksum
            f.write_all_at(b"t", r.offset + 32 + at as u64).unwrap();
        }
        Part::Body => f
            .write_all_at(b"#", r.offset + 32 + r.meta_len + r.body_len / 2)
            .unwrap(),
    }
    f.sync_all().unwrap();
}

async fn summary(pod: &MxPod) -> Value {
    let (code, v) = pod.get("/v1/queue").await;
    assert_eq!(code, 200, "{v}");
    v
}

fn delivered_seqs(primary: &Primary) -> Vec<usize> {
    let mut v: Vec<usize> = primary
        .delivered()
        .iter()
        .filter_map(|m| seq_of(m))
        .collect();
    v.sort_unstable();
    v
}

/// Damages `part` of the third message (seq 2 in the older segment, seq 7 in the middle of the
/// newest), restarts and replays: the nine intact messages reach the primary once each, the
/// damaged one is in `corrupt/` with a DSN to its sender, the damage is reported and its
/// segment outlives the delivery until `mx-pod queue repair`.
async fn one_damaged_record(newest: bool, part: Part) {
    let primary = Primary::start();
    let dsn_sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.dsn_relay = Some(dsn_sink.addr());
    let tag = format!("dmg{}{part:?}", if newest { "new" } else { "old" }).to_lowercase();
    let mut pod = MxPod::start(cfg).await;
    let (older, newer) = two_segments(&mut pod, &tag).await;
    let (segment, damaged_seq) = if newest { (newer, 7) } else { (older, 2) };
    let record = messages_in(&segment)[damaged_seq % 5].clone();
    let damaged_id = record.id.expect("a message record names its id");
    damage(&segment, &record, part);
    pod.restart().await;
    pod.set_replay(1, 0).await;

    let intact: Vec<usize> = (0..10).filter(|s| *s != damaged_seq).collect();
    wait_for(
        "every intact message at the primary",
        Duration::from_secs(60),
        || async { delivered_seqs(&primary) == intact },
    )
    .await;
    wait_for(
        "the damaged message's DSN",
        Duration::from_secs(30),
        || async { !dsn_sink.dumped().is_empty() },
    )
    .await;
    pod.wait_empty(Duration::from_secs(30)).await;
    assert_eq!(delivered_seqs(&primary), intact, "each intact message once");

    // the DSN: to the sender as the envelope read (the envelope part changed its first letter)
    let dsn = String::from_utf8_lossy(&dsn_sink.dumped()[0].1).into_owned();
    let to = match part {
        Part::Envelope => "To: <tender@sender.test>",
        _ => "To: <sender@sender.test>",
    };
    assert!(dsn.contains(to), "{dsn}");
    assert!(
        dsn.contains("Action: failed") && dsn.contains("Status: 5.3.0"),
        "{dsn}"
    );
    assert_eq!(dsn_sink.dumped().len(), 1, "one DSN");
    // corrupt/<id>.json keeps the envelope
    let corrupt: Value = serde_json::from_slice(
        &fs::read(
            pod.queue_dir
                .join("corrupt")
                .join(format!("{damaged_id}.json")),
        )
        .expect("corrupt/<id>.json"),
    )
    .unwrap();
    assert_eq!(corrupt["envelope"]["id"], damaged_id.0, "{corrupt}");

    // reported: the admin API, the metrics, the log
    let s = summary(&pod).await;
    let damage = s["damage"].as_array().expect("damage list");
    assert_eq!(damage.len(), 1, "{s}");
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert_eq!(damage[0]["segment"], name, "{s}");
    let what = match part {
        Part::Header => "record_length",
        Part::Envelope => "record_checksum",
        Part::Body => "body_checksum",
    };
    assert_eq!(damage[0]["what"], what, "{s}");
    assert_eq!(
        damage[0]["messages"],
        serde_json::json!([damaged_id.0]),
        "{s}"
    );
    assert_eq!(pod.metric("mxpod_queue_corrupt_records_total").await, 1.0);
    assert_eq!(pod.metric("mxpod_queue_damaged_segments").await, 1.0);
    assert_eq!(
        pod.metric(&format!("mxpod_queue_damage{{what=\"{what}\"}}"))
            .await,
        1.0
    );
    let log = pod.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("queue damage")),
        "{log}"
    );

    // kept until repaired, although everything in it has left the queue
    send_all(pod.smtp, SENDER, &tag, 10..11, 500).await;
    wait_for("the message after", Duration::from_secs(30), || async {
        delivered_seqs(&primary).contains(&10)
    })
    .await;
    assert!(segment.exists(), "a damaged segment is kept until repaired");
    let (ok, out) = pod.cli_config(&["queue", "repair"]);
    assert!(ok, "{out}");
    assert!(out.contains(what), "{out}");
    assert_eq!(summary(&pod).await["damage"], serde_json::json!([]));
    assert_eq!(pod.metric("mxpod_queue_damaged_segments").await, 0.0);
    // the next write runs the GC: the repaired, finished segment goes
    send_all(pod.smtp, SENDER, &tag, 11..12, 500).await;
    wait_for(
        "the repaired segment to be collected",
        Duration::from_secs(30),
        || async { !segment.exists() },
    )
    .await;
    wait_for("the last message", Duration::from_secs(30), || async {
        delivered_seqs(&primary).contains(&11)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_header_in_an_older_segment() {
    one_damaged_record(false, Part::Header).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_envelope_in_an_older_segment() {
    one_damaged_record(false, Part::Envelope).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_body_in_an_older_segment() {
    one_damaged_record(false, Part::Body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_header_in_the_middle_of_the_newest_segment() {
    one_damaged_record(true, Part::Header).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_envelope_in_the_middle_of_the_newest_segment() {
    one_damaged_record(true, Part::Envelope).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_body_in_the_middle_of_the_newest_segment() {
    one_damaged_record(true, Part::Body).await;
}

/// A removed segment is noticed (its messages are gone, and said so); the other segment's
/// messages are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_segment_is_reported_and_the_rest_delivered() {
    let primary = Primary::start();
    let mut pod = MxPod::start(MxPodConfig::new(&primary.addr())).await;
    let (older, _) = two_segments(&mut pod, "gone").await;
    fs::remove_file(&older).unwrap();
    pod.restart().await;
    pod.set_replay(1, 0).await;
    wait_for(
        "the second segment's messages at the primary",
        Duration::from_secs(60),
        || async { delivered_seqs(&primary) == (5..10).collect::<Vec<_>>() },
    )
    .await;
    let s = summary(&pod).await;
    let damage = s["damage"].as_array().expect("damage list");
    assert_eq!(damage.len(), 1, "{s}");
    assert_eq!(damage[0]["what"], "missing_segment", "{s}");
    assert_eq!(
        damage[0]["segment"],
        older.file_name().unwrap().to_str().unwrap(),
        "{s}"
    );
    assert_eq!(
        pod.metric("mxpod_queue_damage{what=\"missing_segment\"}")
            .await,
        1.0
    );
    assert!(
        pod.log_text()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("missing_segment")),
        "{}",
        pod.log_text()
    );
    // still reported after a restart, until repaired
    pod.kill9();
    pod.restart().await;
    assert_eq!(summary(&pod).await["damage"].as_array().unwrap().len(), 1);
    let (ok, out) = pod.cli_config(&["queue", "repair"]);
    assert!(ok, "{out}");
    pod.kill9();
    pod.restart().await;
    assert_eq!(summary(&pod).await["damage"], serde_json::json!([]));
}

/// `holds.json` removed or garbled while a domain is held: everything stays held (fail safe)
/// and the loss is reported, until an operator releases.
async fn lost_holds(garble: bool) {
    let primary = Primary::start();
    let mut pod = MxPod::start(MxPodConfig::new(&primary.addr())).await;
    let tag = if garble { "holdsgarbled" } else { "holdsgone" };
    send_all(pod.smtp, SENDER, tag, 0..3, 500).await;
    let (ok, out) = pod.cli_config(&["queue", "hold", "--domain", "example.test"]);
    assert!(ok, "{out}");
    pod.kill9();
    let holds = pod.queue_dir.join("holds.json");
    if garble {
        fs::write(&holds, b"{\"all\": fal").unwrap();
    } else {
        fs::remove_file(&holds).unwrap();
    }
    pod.restart().await;
    pod.set_replay(2, 0).await;
    let s = summary(&pod).await;
    assert_eq!(s["held"], true, "fail safe: everything held: {s}");
    let what = if garble {
        "holds_unreadable"
    } else {
        "holds_missing"
    };
    assert_eq!(s["damage"][0]["what"], what, "{s}");
    assert_eq!(
        pod.metric(&format!("mxpod_queue_damage{{what=\"{what}\"}}"))
            .await,
        1.0
    );
    assert!(
        pod.log_text()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(what)),
        "{}",
        pod.log_text()
    );
    assert!(delivered_seqs(&primary).is_empty());
    // `queue list` tells the operator
    let (ok, out) = pod.cli_config(&["queue", "list"]);
    assert!(ok && out.contains("DAMAGE") && out.contains(what), "{out}");
    // the operator releases: the holds file is whole again and the mail goes
    let (ok, out) = pod.cli_config(&["queue", "release"]);
    assert!(ok, "{out}");
    let s = summary(&pod).await;
    assert_eq!(s["held"], false, "{s}");
    assert_eq!(s["damage"], serde_json::json!([]), "{s}");
    wait_for(
        "the released mail at the primary",
        Duration::from_secs(60),
        || async { delivered_seqs(&primary) == vec![0, 1, 2] },
    )
    .await;
    pod.kill9();
    pod.restart().await;
    assert_eq!(summary(&pod).await["damage"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_holds_file_keeps_mail_held_and_is_reported() {
    lost_holds(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_holds_file_keeps_mail_held_and_is_reported() {
    lost_holds(true).await;
}

/// Unmounts the small filesystem when the test ends, however it ends.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes that fail for lack of space (appends, new segments, manifests) never leave damage:
/// filled to `452` with small segments (so segments and manifests are written near the
/// limit), killed with `kill -9` while full, given room again and restarted, the log recovers
/// without damage and every acknowledged message reaches the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_filling_up_leaves_no_damage_and_loses_nothing() {
    let primary = Primary::start();
    let dir = state_dir("fillup");
    let queue_dir = dir.path().join("queue");
    fs::create_dir_all(&queue_dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1536k,mode=0755", "tmpfs"])
        .arg(&queue_dir)
        .status()
        .expect("run mount");
    assert!(ok.success(), "mounting a small tmpfs failed (needs root)");
    let _mount = Mount(queue_dir.clone());
    // room taken now, given back before the restart
    fs::write(queue_dir.join("ballast"), vec![0u8; 256 << 10]).unwrap();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.queue_extra = "segment_size = \"64KiB\"".into();
    let mut pod = MxPod::start_with_queue_dir(dir, queue_dir.clone(), cfg).await;
    let mut acked = BTreeSet::new();
    let mut refused = 0;
    for seq in 0..1000 {
        let r = send(
            pod.smtp,
            SENDER,
            &["user@example.test"],
            &message("fillup", seq, 3000 + (seq % 7) * 700),
        )
        .await
        .unwrap();
        if r.ok() {
            acked.insert(seq);
        } else {
            assert!(r.reply.starts_with("452"), "{r:?}");
            refused += 1;
            // keep pushing a little past the first refusal: writes fail at every stage
            if refused >= 20 {
                break;
            }
        }
    }
    assert!(refused > 0, "the filesystem never filled");
    assert!(acked.len() >= 20, "{} accepted", acked.len());
    assert!(pod.log_text().contains("queue write failed"));
    pod.kill9();
    fs::remove_file(queue_dir.join("ballast")).unwrap();
    pod.restart().await;
    let s = summary(&pod).await;
    assert_eq!(s["damage"], serde_json::json!([]), "no damage: {s}");
    assert_eq!(s["messages"].as_u64(), Some(acked.len() as u64), "{s}");
    pod.set_replay(2, 0).await;
    pod.wait_empty(Duration::from_secs(120)).await;
    wait_for(
        "every acknowledged message at the primary",
        Duration::from_secs(60),
        || async {
            let got: BTreeSet<usize> = delivered_seqs(&primary).into_iter().collect();
            acked.is_subset(&got)
        },
    )
    .await;
    assert!(
        !pod.log_text().contains("queue damage"),
        "{}",
        pod.log_text()
    );
}
