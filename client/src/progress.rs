//! Progress for long commands: on a terminal an indicatif spinner names the
//! step in progress (with its elapsed time) and leaves a line per finished
//! step; otherwise (logs, scripts, tests) one plain line per step.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Steps {
    bar: Option<ProgressBar>,
    current: Option<String>,
}

impl Steps {
    /// A spinner on stderr when it is a terminal, plain lines on stdout
    /// otherwise. `quiet` shows nothing (for `-o json`).
    pub fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(80));
            bar
        });
        Self {
            bar,
            current: (!quiet).then(String::new),
        }
    }

    /// The step now in progress; the previous one is done.
    pub fn step(&mut self, step: &str) {
        let Some(current) = &mut self.current else {
            return;
        };
        match &self.bar {
            Some(bar) => {
                if !current.is_empty() {
                    bar.println(format!("✓ {current}"));
                }
                bar.set_message(step.to_string());
            }
            None => println!("{step}"),
        }
        *current = step.to_string();
    }

    /// Everything is done (or failed): clear the spinner, keep the lines.
    pub fn finish(&mut self, ok: bool) {
        if let (Some(bar), Some(current)) = (self.bar.take(), &self.current) {
            if !current.is_empty() {
                let mark = if ok { "✓" } else { "✗" };
                bar.println(format!("{mark} {current}"));
            }
            bar.finish_and_clear();
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
