//! How far a long export or import is: a bar on a terminal, a log line every few seconds
//! otherwise (a pod's log, a CI job).

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// How often a log line is written when not at a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// How often the bar is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(200);

/// The progress of one export or import.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    objects: u64,
    started: Instant,
    shown: Instant,
    bar: bool,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Progress {
    /// The progress of `what` ("exporting", "importing") of `total` bytes when known;
    /// drawn as a bar when standard error is a terminal.
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total,
            done: 0,
            objects: 0,
            started: now,
            shown: now,
            bar: std::io::stderr().is_terminal(),
        }
    }

    /// `n` more bytes done.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        let every = if self.bar { DRAW_EVERY } else { LOG_EVERY };
        if self.shown.elapsed() >= every {
            self.shown = Instant::now();
            self.show();
        }
    }

    /// One more object done.
    pub fn object(&mut self) {
        self.objects += 1;
    }

    /// Seconds since the start.
    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn show(&self) {
        let rate = self.done as f64 / MIB / self.seconds().max(1e-3);
        let done = self.done as f64 / MIB;
        if self.bar {
            let (bar, of) = match self.total.filter(|&t| t > 0) {
                Some(t) => {
                    let filled = ((self.done.min(t) * 30) / t) as usize;
                    (
                        format!("[{}{}] ", "#".repeat(filled), " ".repeat(30 - filled)),
                        format!("/{:.1}", t as f64 / MIB),
                    )
                }
                None => (String::new(), String::new()),
            };
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r{} {bar}{done:.1}{of} MiB, {} objects, {rate:.1} MiB/s ",
                self.what, self.objects
            );
            let _ = err.flush();
        } else {
            tracing::info!(
                what = self.what,
                mib = format!("{done:.1}"),
                total_mib = self.total.map(|t| format!("{:.1}", t as f64 / MIB)),
                objects = self.objects,
                mib_per_s = format!("{rate:.1}"),
                "bundle progress"
            );
        }
    }

    /// Ends the bar's line.
    pub fn finish(&self) {
        if self.bar {
            self.show();
            eprintln!();
        }
    }
}
