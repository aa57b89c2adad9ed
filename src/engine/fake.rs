//! The engine loop and [`Generation`] driven by a scripted backend (no
//! Python, no model): ordering, cancellation, errors, stop sequences and
//! admission permits, checked at the engine's own boundary.
//!
//! A request's script is its last message's words: each word is one token
//! whose text is ` word`; `<fail>` fails the request at that token; `<eos>`
//! ends it (EOS); running out of words or reaching `max_tokens` ends it by
//! length.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::worker::{Backend, StepItem, Submitted};
use super::*;

struct Script {
    words: VecDeque<String>,
    left: u64,
}

pub(crate) struct FakeBackend {
    running: Vec<(u64, Script)>,
    /// What the loop asked for, in order: `submit 3`, `step [1, 3]`, `cancel 1`.
    log: Arc<Mutex<Vec<String>>>,
    /// When set, the next step that runs two or more sequences fails as a
    /// whole with this message.
    fail_next_step: Arc<Mutex<Option<String>>>,
}

/// Each step takes this long, as a model's would (so that a client can act
/// while a sequence still runs).
const STEP: std::time::Duration = std::time::Duration::from_millis(5);

impl Backend for FakeBackend {
    fn submit(&mut self, rid: u64, req: &GenerateRequest, _tokens: Option<Vec<u32>>) -> Result<Submitted, ApiError> {
        let text = req.prompt.messages.last().map(|m| m.content.clone()).unwrap_or_default();
        if text.is_empty() {
            return Err(ApiError::InvalidRequest("the prompt is empty".into()));
        }
        self.log.lock().unwrap().push(format!("submit {rid}"));
        let words: VecDeque<String> = text.split_whitespace().map(str::to_string).collect();
        let max_tokens = req.max_tokens.min(words.len() as u64) as u32;
        self.running.push((rid, Script { words, left: req.max_tokens }));
        Ok(Submitted { prompt_tokens: text.split_whitespace().count() as u32, cached_tokens: 0, max_tokens })
    }

    fn tokenize(&mut self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        Ok(prompt.messages.iter().flat_map(|m| m.content.split_whitespace()).map(|w| w.len() as u32).collect())
    }

    fn cancel(&mut self, rid: u64) {
        self.log.lock().unwrap().push(format!("cancel {rid}"));
        self.running.retain(|(r, _)| *r != rid);
    }

    fn step(&mut self) -> Result<Vec<StepItem>, ApiError> {
        let rids: Vec<u64> = self.running.iter().map(|(r, _)| *r).collect();
        self.log.lock().unwrap().push(format!("step {rids:?}"));
        std::thread::sleep(STEP);
        if rids.len() >= 2 {
            if let Some(msg) = self.fail_next_step.lock().unwrap().take() {
                self.running.clear();
                return Err(ApiError::Internal(msg));
            }
        }
        let mut items = vec![];
        let mut done = vec![];
        for (rid, s) in &mut self.running {
            let word = s.words.pop_front();
            s.left = s.left.saturating_sub(1);
            let item = |pieces, finish: Option<&str>, error: Option<String>| StepItem {
                rid: *rid,
                pieces,
                finish: finish.map(str::to_string),
                error,
                counts: true,
                logprob: None,
            };
            match word.as_deref() {
                Some("<fail>") => {
                    items.push(item(vec![], None, Some("RuntimeError: scripted failure".into())));
                    done.push(*rid);
                }
                Some("<eos>") => {
                    items.push(item(vec![], Some("stop"), None));
                    done.push(*rid);
                }
                Some(w) => {
                    let end = s.left == 0 || s.words.is_empty();
                    items.push(item(vec![Piece::Text(format!(" {w}"))], end.then_some("length"), None));
                    if end {
                        done.push(*rid);
                    }
                }
                None => {
                    items.push(item(vec![], Some("length"), None));
                    done.push(*rid);
                }
            }
        }
        self.running.retain(|(r, _)| !done.contains(r));
        Ok(items)
    }

    fn memory(&mut self) -> Option<MemorySnapshot> {
        None
    }

    fn check_sampling(&mut self) -> Option<String> {
        None
    }

    fn wait<T: Send>(&mut self, f: impl FnOnce() -> T + Send) -> T {
        f()
    }
}

/// A handle over the fake backend, as `EngineHandle::start` builds one over
/// the model: its log of backend calls and a switch to fail the next step.
struct Harness {
    engine: EngineHandle,
    log: Arc<Mutex<Vec<String>>>,
    fail_next_step: Arc<Mutex<Option<String>>>,
}

fn harness(max_concurrent: u32, max_queue: u32) -> Harness {
    let log = Arc::new(Mutex::new(vec![]));
    let fail_next_step = Arc::new(Mutex::new(None));
    let mut backend = FakeBackend { running: vec![], log: log.clone(), fail_next_step: fail_next_step.clone() };
    let (tx, rx) = std::sync::mpsc::channel();
    let status = Arc::new(EngineStatus::new());
    status.set_state(EngineState::Ready);
    let st = status.clone();
    let thread = super::threads::run(move || worker::serve(&mut backend, rx, &st)).unwrap();
    let engine = EngineHandle {
        tx,
        status,
        admission: Arc::new(Admission::new(max_concurrent, max_queue, 0)),
        next_id: Arc::new(AtomicU64::new(1)),
        thread: Arc::new(Mutex::new(Some(thread))),
        tokenizer: None,
        special_tokens_in_content: false,
        grammars: Arc::new(Err("the fake engine has no vocabulary".into())),
        stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    Harness { engine, log, fail_next_step }
}

fn request(words: &str, max_tokens: u64, stop: &[&str]) -> GenerateRequest {
    let prompt = Prompt { messages: vec![ChatMessage::new("user", words)], ..Default::default() };
    GenerateRequest::new(prompt, max_tokens, Sampling::greedy(), stop.iter().map(|s| s.to_string()).collect())
}

async fn wait_for(log: &Arc<Mutex<Vec<String>>>, line: &str) {
    for _ in 0..500 {
        if log.lock().unwrap().iter().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("the backend never saw {line:?}: {:?}", log.lock().unwrap());
}

#[tokio::test]
async fn tokens_reach_their_own_request_in_order_and_reasons_are_mapped() {
    let h = harness(4, 4);
    let (a, b) =
        tokio::join!(h.engine.generate(request("a b c d e", 100, &[])), h.engine.generate(request("x y <eos> z", 100, &[])));
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.max_tokens, 5);
    let (ra, rb) = tokio::join!(a.collect(), b.collect());
    let ((ta, ra), (tb, rb)) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ta.text(), ra), (" a b c d e".to_string(), StopReason::MaxTokens));
    assert_eq!((tb.text(), rb), (" x y".to_string(), StopReason::EndTurn));
    assert_eq!(a.output_tokens(), 5);
    assert_eq!(b.output_tokens(), 3, "the EOS token counts, as hosted APIs count it");
    let log = h.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l == "step [1, 2]"), "both shared steps: {log:?}");
    h.engine.shutdown();
}

#[tokio::test]
async fn a_failing_request_fails_alone_and_a_failed_step_fails_everyone() {
    // Two slots: a generation that is not dropped would hold one for good.
    let h = harness(2, 4);
    let mut bad_gen = h.engine.generate(request("a <fail> c", 100, &[])).await.unwrap();
    let mut good_gen = h.engine.generate(request("p q r s", 100, &[])).await.unwrap();
    let (bad, good) = tokio::join!(bad_gen.collect(), good_gen.collect());
    drop((bad_gen, good_gen)); // their slots
    assert!(matches!(bad, Err(ApiError::Internal(ref m)) if m.contains("scripted failure")) || bad.is_err(), "{bad:?}");
    assert_eq!(good.unwrap().0.text(), " p q r s");

    *h.fail_next_step.lock().unwrap() = Some("the whole step broke".into());
    let mut x_gen = h.engine.generate(request("a b c d e f g h i j", 100, &[])).await.unwrap();
    let mut y_gen = h.engine.generate(request("k l m n o p q r s t", 100, &[])).await.unwrap();
    let (x, y) = tokio::join!(x_gen.collect(), y_gen.collect());
    drop((x_gen, y_gen));
    for r in [x, y] {
        assert!(matches!(r, Err(ApiError::Internal(ref m)) if m == "the whole step broke"), "{r:?}");
    }
    // The loop keeps serving.
    let mut z = h.engine.generate(request("still here", 100, &[])).await.unwrap();
    assert_eq!(z.collect().await.unwrap().0.text(), " still here");
    h.engine.shutdown();
}

#[tokio::test]
async fn a_stop_sequence_across_tokens_ends_the_text_and_the_sequence() {
    let h = harness(4, 4);
    let mut g = h.engine.generate(request("one two three four five six seven eight", 100, &["wo thr"])).await.unwrap();
    let (out, reason) = g.collect().await.unwrap();
    assert_eq!(out.text(), " one t");
    assert_eq!(reason, StopReason::StopSequence("wo thr".into()));
    drop(g);
    // The engine was told to stop it before it ran out of words.
    wait_for(&h.log, "cancel 1").await;
    let steps = h.log.lock().unwrap().iter().filter(|l| l.starts_with("step")).count();
    assert!(steps < 8, "cancelled early, not run to the end: {:?}", h.log.lock().unwrap());
    h.engine.shutdown();
}

#[tokio::test]
async fn a_dropped_generation_is_cancelled_and_frees_its_slot() {
    let h = harness(1, 1);
    let long = "w ".repeat(100_000);
    let mut g = h.engine.generate(request(&long, 1_000_000, &[])).await.unwrap();
    assert!(matches!(g.next().await, Some(GenEvent::Text(_))));
    assert_eq!(h.engine.admission().in_use(), 1);
    // A second request waits for the only slot; a third finds the queue full (529).
    let engine = h.engine.clone();
    let waiting = tokio::spawn(async move { engine.generate(request("after the first", 10, &[])).await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "waits for the slot");
    let third = h.engine.generate(request("no room", 10, &[])).await;
    assert!(matches!(third, Err(ApiError::Overloaded { .. })), "{:?}", third.err());
    drop(g);
    wait_for(&h.log, "cancel 1").await;
    waiting.await.unwrap().unwrap();
    h.engine.shutdown();
}
