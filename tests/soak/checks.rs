//! After each restart: the live volume and every shadow copy against the model.

use super::*;

/// After a restart: the live volume against the lanes of the round that
/// ended; then the lanes' bases are what was read (flushed).
pub(crate) fn check_live(sh: &Shared) {
    let mut conn = match Raw::try_go(&sh.socket, "live", IO_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return sh.violation(format!("after restart: cannot open the live export: {e}")),
    };
    let got = match read_all(&mut conn) {
        Ok(g) => g,
        Err(e) => return sh.violation(format!("after restart: reading the live volume: {e}")),
    };
    for (w, lane) in sh.lanes.iter().enumerate() {
        let mut l = lock(lane);
        let start = w * REGION;
        let allowed = l.allowed();
        let in_flight = l.log.get(l.acked).copied();
        let mut bad = Vec::new();
        let mut lost = 0;
        for (i, (&v, ok)) in got.ids[start..start + REGION]
            .iter()
            .zip(&allowed)
            .enumerate()
        {
            if !ok.contains(&v) {
                bad.push(i);
            }
            let flying = matches!(in_flight, Some(Op::Write { id, first, n, .. })
                if id == v && (first..first + n).contains(&((start + i) as u32)));
            if v != l.cur[i] && !flying {
                lost += 1;
            }
        }
        add(&sh.stats.unflushed_lost, lost);
        if !bad.is_empty() {
            let mut msg = format!(
                "live volume after restart: {} blocks of region {w} hold a value they cannot:",
                bad.len()
            );
            for &i in bad.iter().take(4) {
                let _ = write!(
                    msg,
                    " block {} (offset {}) holds {}, allowed {:?} (durable first);",
                    start + i,
                    (start + i) * BLOCK,
                    got.show(start + i),
                    allowed[i]
                );
            }
            sh.violation(msg);
        }
        l.base = got.ids[start..start + REGION].to_vec();
    }
    match conn.cmd(NBD_CMD_FLUSH, 0, 0, 0, &[], &mut Vec::new()) {
        Ok(0) => {}
        r => sh.violation(format!("after restart: FLUSH failed: {r:?}")),
    }
}

/// After a restart: the listed shadow copies against the book.
pub(crate) fn check_shadows(sh: &Shared, rng: &mut Rng) {
    let out = sh.vs(&["list", "shadows", "--for", IMG, "--json"]);
    if !out.status.success() {
        return sh.violation(format!("list shadows after restart: {}", stderr(&out)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    sh.event(&format!(
        "listed after restart: {}",
        v["shadows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!(
                "{} seq {} persistent {}",
                s["id"], s["seq"], s["persistent"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut listed: BTreeMap<String, bool> = v["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["persistent"].as_bool().unwrap(),
            )
        })
        .collect();
    let mut b = lock(&sh.book);
    let mut verify = |id: &str, expect: &Expect, what: &str| -> Option<Arc<Vec<u32>>> {
        let cli = rng.one_in(4);
        let got = if cli {
            read_cli(&sh.dir, id)
        } else {
            read_export(&sh.socket, id)
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                sh.violation(format!("{what} shadow copy {id}: cannot read it: {e}"));
                return None;
            }
        };
        add(&sh.stats.checked, 1);
        add(&sh.stats.checked_bytes, IMG_SIZE);
        match check_shadow(expect, &got) {
            Ok(exact) => Some(exact),
            Err(e) => {
                let how = if cli { "volshadow read" } else { "NBD" };
                sh.violation(format!(
                    "{what} shadow copy {id} after restart ({how}): {e}"
                ));
                Some(Arc::new(got.ids))
            }
        }
    };
    let mut keep = Vec::new();
    for mut s in std::mem::take(&mut b.shadows) {
        let present = listed.remove(&s.id);
        match (s.persistent, s.life, present) {
            (false, _, Some(_)) => sh.violation(format!(
                "non-persistent shadow copy {} survived the kill",
                s.id
            )),
            (false, _, None) => {}
            (true, Life::Live, None) => sh.violation(format!(
                "persistent shadow copy {} (create acknowledged) is gone after restart",
                s.id
            )),
            (true, life, Some(persistent)) => {
                if !persistent {
                    sh.violation(format!("shadow copy {} is listed as non-persistent", s.id));
                }
                let what = if life == Life::Deleting {
                    add(&sh.stats.deletes_cut_kept, 1);
                    "(delete in flight at the kill)"
                } else {
                    "persistent"
                };
                if let Some(exact) = verify(&s.id, &s.expect, what) {
                    s.expect = Expect::Exact(exact);
                }
                s.life = Life::Live;
                keep.push(s);
            }
            (true, Life::Deleting, None) => {
                let round = sh.round.load(Ordering::SeqCst);
                b.deleted.push(Gone {
                    id: s.id,
                    how: format!(
                        "its delete was in flight at round {round}'s kill and it was not \
                         listed after that restart"
                    ),
                    expect: s.expect,
                });
            }
        }
    }
    b.shadows = keep;
    for g in &b.deleted {
        if listed.remove(&g.id).is_some() {
            let contents = match read_export(&sh.socket, &g.id) {
                Ok(got) => match check_shadow(&g.expect, &got) {
                    Ok(_) => "it reads its old contents intact".to_string(),
                    Err(e) => format!("its contents differ: {e}"),
                },
                Err(e) => format!("it cannot be read: {e}"),
            };
            sh.violation(format!(
                "shadow copy {} is listed again after restart, but {}; {contents}",
                g.id, g.how
            ));
        }
    }
    // An unknown id may be the create in flight at the kill (one at most).
    let mut pending = b.pending.take();
    for (id, persistent) in listed {
        let expect = match pending.take() {
            Some(Pending::Known {
                persistent: true,
                expect,
            }) if persistent => expect,
            Some(Pending::Open { .. }) => {
                unreachable!("open creates are settled when the round ends")
            }
            other => {
                pending = other;
                sh.violation(format!(
                    "unknown shadow copy {id} (persistent: {persistent}) after restart"
                ));
                continue;
            }
        };
        add(&sh.stats.creates_cut_kept, 1);
        let exact = verify(&id, &expect, "(create in flight at the kill)");
        b.shadows.push(Shadow {
            id,
            persistent: true,
            expect: Expect::Exact(exact.unwrap_or_else(|| Arc::new(vec![GARBAGE; BLOCKS]))),
            life: Life::Live,
            pins: 0,
        });
    }
    drop(b);
    let out = sh.vs(&["verify", "--for", IMG, "--json"]);
    if !out.status.success() {
        sh.violation(format!(
            "verify after restart: {} {}",
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
}
