//! Text-level stop sequences.
//!
//! Tokens arrive as text fragments whose boundaries have nothing to do with
//! the stop strings, so a stop sequence can straddle several tokens. The
//! matcher holds back the shortest tail that could still grow into a stop
//! sequence and releases everything before it; a matched stop sequence (and
//! whatever followed it in the same fragment) is never released.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one pushed fragment produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that can no longer be part of a stop sequence: safe to send.
    pub emit: String,
    /// Index into the stop list of the sequence that matched, if one did.
    pub matched: Option<usize>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any output).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    pub fn push(&mut self, fragment: &str) -> StopOutput {
        if self.stops.is_empty() {
            return StopOutput { emit: fragment.to_string(), matched: None };
        }
        self.held.push_str(fragment);
        // Earliest match wins; among matches at the same place, the longest.
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.stops.iter().enumerate() {
            if let Some(pos) = self.held.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((bpos, bi)) => pos < bpos || (pos == bpos && s.len() > self.stops[bi].len()),
                };
                if better {
                    best = Some((pos, i));
                }
            }
        }
        if let Some((pos, i)) = best {
            let emit = self.held[..pos].to_string();
            self.held.clear();
            return StopOutput { emit, matched: Some(i) };
        }
        let keep = self.partial_tail_len();
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutput { emit, matched: None }
    }

    /// Releases whatever is held back (generation ended without a match).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some
    /// stop sequence, on a char boundary.
    fn partial_tail_len(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            let max = s.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && s.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], frags: &[&str]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for f in frags {
            let o = m.push(f);
            out.push_str(&o.emit);
            if o.matched.is_some() {
                return (out, o.matched);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn match_within_one_fragment() {
        assert_eq!(run(&["STOP"], &["hello STOP world"]), ("hello ".into(), Some(0)));
    }

    #[test]
    fn match_across_fragments() {
        assert_eq!(run(&["</end>"], &["abc</", "en", "d>tail"]), ("abc".into(), Some(0)));
    }

    #[test]
    fn near_miss_is_released() {
        assert_eq!(run(&["</end>"], &["abc</", "en", "x"]), ("abc</enx".into(), None));
    }

    #[test]
    fn held_tail_is_flushed_at_end() {
        let stops = vec!["XYZ".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abcX").emit, "abc");
        assert_eq!(m.push("Y").emit, "");
        assert_eq!(m.flush(), "XY");
    }

    #[test]
    fn earliest_of_several_wins() {
        assert_eq!(run(&["world", "lo"], &["hello world"]), ("hel".into(), Some(1)));
    }

    #[test]
    fn multibyte_boundaries_are_respected() {
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), Some(0)));
        assert_eq!(run(&["日本"], &["今日は", "日", "本"]), ("今日は".into(), Some(0)));
        assert_eq!(run(&["日本"], &["今日は日", "曜"]), ("今日は日曜".into(), None));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), None));
    }

    #[test]
    fn stop_at_very_start() {
        assert_eq!(run(&["ab"], &["a", "b", "c"]), ("".into(), Some(0)));
    }
}
