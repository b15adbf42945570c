//! The server's own tests: answers owed by requests whose handler failed.

use std::sync::Arc;

use tokio::sync::Semaphore;

use halfmq::Error;
use halfmq_client::frame::{self, FRAME_BYTES_MAX_DEFAULT};
use halfmq_client::protocol::{self, Response};

use super::connection::Answer;
use super::outbox::{NetCounters, Outbox};

fn answer_of(bytes: &[u8]) -> (u64, Response) {
    let f = frame::parse_ref(bytes).unwrap();
    (f.correlation, protocol::decode(f.body).unwrap())
}

async fn panicking_handler(answer: Answer) {
    let _answer = answer;
    panic!("handler bug");
}

#[tokio::test]
async fn a_handler_that_panics_still_answers() {
    for queue_full in [false, true] {
        // Room for one frame of 100 bytes.
        let (out, mut rx) = Outbox::new(100, Arc::new(NetCounters::default()));
        if queue_full {
            assert!(out.send(vec![7; 100]).await);
        }
        let in_flight = Arc::new(Semaphore::new(1));
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        let answer = Answer::new(out, 42, FRAME_BYTES_MAX_DEFAULT, permit);
        assert!(tokio::spawn(panicking_handler(answer)).await.is_err());
        if queue_full {
            // The answer waits for room, and so does the request's permit.
            assert_eq!(in_flight.available_permits(), 0);
            assert_eq!(rx.recv().await.unwrap().as_ref(), &[7; 100][..]);
        }
        let (id, resp) = answer_of(rx.recv().await.unwrap().as_ref());
        assert_eq!(id, 42);
        assert!(
            matches!(resp, Response::Error { code, .. } if code == Error::Poisoned(String::new()).code()),
            "{resp:?}"
        );
        // The permit comes back once the answer is queued.
        let _ = in_flight.acquire().await.unwrap();
    }
}

#[tokio::test]
async fn an_answered_request_sends_one_frame_and_frees_its_permit() {
    let (out, mut rx) = Outbox::new(1 << 20, Arc::new(NetCounters::default()));
    let in_flight = Arc::new(Semaphore::new(1));
    let permit = in_flight.clone().acquire_owned().await.unwrap();
    let mut answer = Answer::new(out.clone(), 7, FRAME_BYTES_MAX_DEFAULT, permit);
    // Room for a whole frame taken first; what the answer does not use goes back at once.
    assert!(answer.reserve(FRAME_BYTES_MAX_DEFAULT as usize).await);
    assert!(out.busy());
    answer.send(&Response::Ok).await;
    assert_eq!(in_flight.available_permits(), 1);
    let frame = rx.recv().await.unwrap();
    assert!(out.try_reserve((1 << 20) - frame.as_ref().len()).is_some());
    assert_eq!(answer_of(frame.as_ref()), (7, Response::Ok));
    drop(frame);
    assert!(!out.busy(), "a written frame gives its room back");
    drop(out);
    assert!(rx.recv().await.is_none());
}

/// A write that takes no byte for the limit fails; one whose reader takes bytes now and
/// then, each within the limit, goes on however long the whole write takes.
#[tokio::test(start_paused = true)]
async fn a_write_fails_only_when_no_byte_is_taken_for_the_limit() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::outbox::TimedWrite;

    let limit = Duration::from_secs(1);
    // Nobody reads: the pipe's 16 bytes fill up, then nothing moves for the limit.
    let (a, _b) = tokio::io::duplex(16);
    let mut w = TimedWrite::new(a, limit);
    let started = tokio::time::Instant::now();
    let e = w.write_all(&[1; 64]).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() >= limit);

    // A reader that takes 8 bytes every 0.9 limit: 64 bytes take 7 such waits, longer
    // than the limit in all, and the write succeeds.
    let (a, mut b) = tokio::io::duplex(8);
    let mut w = TimedWrite::new(a, limit);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut chunk = [0u8; 8];
        while got.len() < 64 {
            tokio::time::sleep(limit * 9 / 10).await;
            let n = b.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        got
    });
    let started = tokio::time::Instant::now();
    w.write_all(&[2; 64]).await.unwrap();
    assert!(started.elapsed() > limit);
    assert_eq!(reader.await.unwrap(), vec![2; 64]);
}
