//! The server's own tests: answers owed by requests whose handler failed.

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use halfmq::Error;
use halfmq_client::frame::{self, FRAME_BYTES_MAX_DEFAULT};
use halfmq_client::protocol::{self, Response};

use super::connection::Answer;

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
        let (out, mut rx) = mpsc::channel(1);
        if queue_full {
            out.send(b"earlier frame".to_vec()).await.unwrap();
        }
        let in_flight = Arc::new(Semaphore::new(1));
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        let answer = Answer::new(out, 42, FRAME_BYTES_MAX_DEFAULT, permit);
        assert!(tokio::spawn(panicking_handler(answer)).await.is_err());
        if queue_full {
            // The answer waits for room, and so does the request's permit.
            assert_eq!(in_flight.available_permits(), 0);
            assert_eq!(rx.recv().await.unwrap(), b"earlier frame");
        }
        let (id, resp) = answer_of(&rx.recv().await.unwrap());
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
    let (out, mut rx) = mpsc::channel(4);
    let in_flight = Arc::new(Semaphore::new(1));
    let permit = in_flight.clone().acquire_owned().await.unwrap();
    Answer::new(out, 7, FRAME_BYTES_MAX_DEFAULT, permit)
        .send(&Response::Ok)
        .await;
    assert_eq!(in_flight.available_permits(), 1);
    assert_eq!(answer_of(&rx.recv().await.unwrap()), (7, Response::Ok));
    assert!(rx.recv().await.is_none());
}
