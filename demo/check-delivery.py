#!/usr/bin/env python3
"""check-delivery.py MAILDIR MAILLOG SENT_TSV - what the primary got, for both demos.

SENT_TSV has one line per message a backup accepted: NUMBER <TAB> SUBJECT <TAB> QUEUE (the pod,
or the one mx-pod), in the order each queue accepted them. Checks the primary's maildir (each
message once; "load message" files are counted apart) and its maillog's arrival order (the
order of smtpd's 'info: END-OF-MESSAGE' lines, one per committed message, each named by the
'info: header Subject:' line our header_checks rule logs): each queue's messages must arrive in
the order it accepted them. Prints a report; the last line is
    RESULT delivered duplicates out_of_order received_in_log load_messages
"""
import email, os, re, sys
maildir, maillog, sent_tsv = sys.argv[1], sys.argv[2], sys.argv[3]
sent = []  # (subject, pod) in the order each pod received them
with open(sent_tsv) as fh:
    for line in fh:
        num, subject, pod = line.rstrip("\n").split("\t")
        sent.append((subject, pod))
want = [s for s, _ in sent]
pod_of = dict(sent)
# 1. the maildir: one file per delivered message
seen, other, load = {}, 0, 0
for sub in ("new", "cur"):
    d = os.path.join(maildir, sub)
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        with open(os.path.join(d, f), "rb") as fh:
            s = (email.message_from_binary_file(fh).get("Subject") or "").strip()
        if s in pod_of:
            seen[s] = seen.get(s, 0) + 1
        elif s == "load message":
            load += 1
        else:
            other += 1
delivered = len(seen)
dups = sum(c - 1 for c in seen.values())
missing = [s for s in want if s not in seen]
print("maildir: %d file(s) with a demo subject, %d distinct, %d duplicate(s), %d load message(s), %d other file(s)"
      % (sum(seen.values()), delivered, dups, load, other))
for s in missing:
    print("  missing: %s (queued on %s)" % (s, pod_of[s]))
for s, c in sorted(seen.items()):
    if c > 1:
        print("  duplicate: %s (%d copies)" % (s, c))
# 2. the arrival order at the primary: the order it committed the messages in (smtpd's
# END-OF-MESSAGE line at each final dot), each queue ID named by its Subject line
subject_rx = re.compile(r"cleanup\[\d+\]: (\w+): info: header Subject: (demo message \d{3}) from")
commit_rx = re.compile(r"smtpd\[\d+\]: (\w+): info: END-OF-MESSAGE from ")
subject_of, commits = {}, []
with open(maillog, errors="replace") as fh:
    for line in fh:
        m = subject_rx.search(line)
        if m:
            subject_of[m.group(1)] = m.group(2)
        m = commit_rx.search(line)
        if m:
            commits.append((line[:15], m.group(1)))
order = [(ts, qid, subject_of[qid]) for ts, qid in commits
         if subject_of.get(qid) in pod_of]
print("arrival at the primary (%d received):" % len(order))
for ts, qid, s in order:
    print("  %s  %s  %-18s from %s" % (ts, qid, s, pod_of[s]))
# 3. per pod: the primary must receive each pod's messages in the order the pod accepted them
out_of_order = 0
for pod in sorted(set(p for _, p in sent)):
    expect = [s for s, p in sent if p == pod]
    got = [s for _, _, s in order if pod_of[s] == pod]
    inv = sum(1 for a, b in zip(got, got[1:]) if expect.index(a) > expect.index(b))
    out_of_order += inv
    print("%s: %d accepted, %d received by the primary, %s" % (pod, len(expect), len(got),
          "in order" if got == expect else "%d out of order" % inv if inv else
          "in order, %d missing" % (len(expect) - len(got))))
print("RESULT %d %d %d %d %d" % (delivered, dups, out_of_order, len(order), load))
