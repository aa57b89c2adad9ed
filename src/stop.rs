//! Text-level stop sequences, matched with an Aho-Corasick automaton.
//!
//! Tokens arrive as text fragments whose boundaries have nothing to do with
//! the stop strings, so a stop sequence can straddle several tokens. The
//! matcher holds back the shortest tail that could still grow into a stop
//! sequence and releases everything before it; a matched stop sequence (and
//! whatever followed it in the same fragment) is never released.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    automaton: Automaton,
    /// The automaton's state after everything pushed so far.
    state: u32,
    /// Text not released yet: a suffix that could still grow into a stop.
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
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let automaton = Automaton::new(&stops);
        StopMatcher { stops, automaton, state: ROOT, held: String::new() }
    }

    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Feeds one fragment. Every byte steps the automaton once (amortized
    /// constant time, whatever the number and length of the stops); once the
    /// fragment is in, the earliest-starting complete stop wins (the longest
    /// among those starting at the same place), else everything but the
    /// longest suffix that begins some stop is released.
    pub fn push(&mut self, fragment: &str) -> StopOutput {
        if self.stops.is_empty() {
            return StopOutput { emit: fragment.to_string(), matched: None };
        }
        let offset = self.held.len();
        self.held.push_str(fragment);
        // (start in `held`, length, stop index)
        let mut best: Option<(usize, usize, usize)> = None;
        for (i, &b) in fragment.as_bytes().iter().enumerate() {
            self.state = self.automaton.step(self.state, b);
            let end = offset + i + 1;
            for (len, idx) in self.automaton.matches(self.state) {
                let start = end - len;
                let better = match best {
                    None => true,
                    Some((bs, bl, _)) => start < bs || (start == bs && len > bl),
                };
                if better {
                    best = Some((start, len, idx));
                }
            }
        }
        if let Some((start, _, idx)) = best {
            let emit = self.held[..start].to_string();
            self.held.clear();
            self.state = ROOT;
            return StopOutput { emit, matched: Some(idx) };
        }
        // The state's depth is the longest suffix of the text that is a
        // prefix of some stop; it starts on a char boundary because the stop
        // it begins starts with one.
        let keep = (self.automaton.depth(self.state) as usize).min(self.held.len());
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutput { emit, matched: None }
    }

    /// Releases whatever is held back (generation ended without a match).
    pub fn flush(&mut self) -> String {
        self.state = ROOT;
        std::mem::take(&mut self.held)
    }
}

const ROOT: u32 = 0;

/// An Aho-Corasick automaton over the stops' bytes: a trie whose nodes know
/// their depth, where to fall back on a mismatch (the longest proper suffix
/// that is also in the trie) and the next node on that chain that ends a stop.
#[derive(Debug, Clone, Default)]
struct Automaton {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// Children by byte, sorted.
    next: Vec<(u8, u32)>,
    fail: u32,
    depth: u32,
    /// The stop (its index) that ends exactly here.
    ends: Option<usize>,
    /// The nearest node on the fail chain that ends a stop (ROOT: none).
    output: u32,
}

impl Automaton {
    fn new(stops: &[String]) -> Automaton {
        let mut nodes = vec![Node::default()];
        for (idx, s) in stops.iter().enumerate() {
            let mut at = ROOT;
            for &b in s.as_bytes() {
                at = match nodes[at as usize].next.binary_search_by_key(&b, |e| e.0) {
                    Ok(i) => nodes[at as usize].next[i].1,
                    Err(i) => {
                        let id = nodes.len() as u32;
                        let depth = nodes[at as usize].depth + 1;
                        nodes.push(Node { depth, ..Node::default() });
                        nodes[at as usize].next.insert(i, (b, id));
                        id
                    }
                };
            }
            // A repeated stop keeps its first index.
            nodes[at as usize].ends.get_or_insert(idx);
        }
        // Breadth first: a node's fail link is resolved before its children's.
        let mut queue: std::collections::VecDeque<u32> = nodes[0].next.iter().map(|e| e.1).collect();
        let mut a = Automaton { nodes };
        while let Some(n) = queue.pop_front() {
            let children = a.nodes[n as usize].next.clone();
            for (b, child) in children {
                let mut f = a.nodes[n as usize].fail;
                let fail = loop {
                    if let Some(t) = a.child(f, b) {
                        break t;
                    }
                    if f == ROOT {
                        break ROOT;
                    }
                    f = a.nodes[f as usize].fail;
                };
                let output = if a.nodes[fail as usize].ends.is_some() { fail } else { a.nodes[fail as usize].output };
                let c = &mut a.nodes[child as usize];
                c.fail = fail;
                c.output = output;
                queue.push_back(child);
            }
        }
        a
    }

    fn child(&self, n: u32, b: u8) -> Option<u32> {
        let next = &self.nodes[n as usize].next;
        next.binary_search_by_key(&b, |e| e.0).ok().map(|i| next[i].1)
    }

    fn step(&self, mut n: u32, b: u8) -> u32 {
        loop {
            if let Some(t) = self.child(n, b) {
                return t;
            }
            if n == ROOT {
                return ROOT;
            }
            n = self.nodes[n as usize].fail;
        }
    }

    fn depth(&self, n: u32) -> u32 {
        self.nodes[n as usize].depth
    }

    /// (length, stop index) of every stop that ends at state `n`.
    fn matches(&self, n: u32) -> impl Iterator<Item = (usize, usize)> + '_ {
        let first = if self.nodes[n as usize].ends.is_some() { n } else { self.nodes[n as usize].output };
        std::iter::successors((first != ROOT).then_some(first), move |&m| {
            let o = self.nodes[m as usize].output;
            (o != ROOT).then_some(o)
        })
        .map(move |m| (self.nodes[m as usize].depth as usize, self.nodes[m as usize].ends.unwrap()))
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
    fn overlapping_and_nested_stops() {
        assert_eq!(run(&["b", "abc"], &["abc"]), ("".into(), Some(1)));
        assert_eq!(run(&["b", "abc"], &["a", "bc"]), ("".into(), Some(1)));
        assert_eq!(run(&["b", "abc"], &["ab", "c"]), ("a".into(), Some(0)));
        assert_eq!(run(&["aab", "ab"], &["aaab"]), ("a".into(), Some(0)));
        assert_eq!(run(&["abcd", "bc"], &["abc", "d"]), ("a".into(), Some(1)));
        assert_eq!(run(&["xx", "xx"], &["axx"]), ("a".into(), Some(0)));
    }

    #[test]
    fn long_stops_sharing_prefixes_with_the_output() {
        // 64 stops of 1 KiB that all begin like the output: the tail held
        // back is as long as the longest prefix seen, never longer.
        let stops: Vec<String> = (0..64).map(|i| format!("{}{i:04}", "a".repeat(1020))).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for _ in 0..5_000 {
            out.push_str(&m.push("a").emit);
        }
        assert_eq!(out.len(), 5_000 - 1020);
        let o = m.push("0042");
        assert_eq!(o.matched, Some(42));
        assert_eq!(out.len() + o.emit.len(), 5_000 - 1020);
    }

    #[test]
    fn stop_at_very_start() {
        assert_eq!(run(&["ab"], &["a", "b", "c"]), ("".into(), Some(0)));
    }
}
