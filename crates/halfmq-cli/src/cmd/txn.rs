//! `halfmq txn`: write a half message, finish, re-arm and list transactions, and answer
//! check-backs as a producer of a group.

use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};
use halfmq::{CheckAnswer, HalfMessage, HalfOptions, Message, Result, TxnId, TxnState};

use super::{json_line, println_flush, ConnArgs};

/// `halfmq txn ...`.
#[derive(Subcommand)]
pub enum TxnCommand {
    /// Write a half message and exit without an outcome, as a crashed payment service would.
    Begin {
        #[command(flatten)]
        conn: ConnArgs,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Key.
        #[arg(long)]
        key: String,
        /// Producer group asked at check-back.
        #[arg(long)]
        group: String,
        /// Body text.
        #[arg(long, default_value = "")]
        body: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Commit a transaction.
    Commit(TxnIdArgs),
    /// Roll back a transaction.
    Rollback(TxnIdArgs),
    /// Check an unfinished transaction again now, with its check count reset.
    Rearm(TxnIdArgs),
    /// Unfinished transactions.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// One JSON object per transaction.
        #[arg(long)]
        json: bool,
    },
    /// Stay connected as a producer of GROUP and answer every check-back with ANSWER.
    Checker {
        #[command(flatten)]
        conn: ConnArgs,
        /// Producer group.
        #[arg(long)]
        group: String,
        /// The answer to give.
        #[arg(long, value_enum)]
        answer: AnswerArg,
    },
}

/// One transaction of a running broker.
#[derive(Args)]
pub struct TxnIdArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Transaction id.
    id: u64,
}

/// `--state` of `txn list`.
#[derive(Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Waiting for an outcome or a check-back.
    Pending,
    /// Checked `txn_check_max` times without an answer: waiting for a person.
    Unresolved,
}

/// `--answer` of `txn checker`.
#[derive(Clone, Copy, ValueEnum)]
pub enum AnswerArg {
    /// Make the message visible.
    Commit,
    /// Drop the message.
    Rollback,
    /// Do not know yet: the broker asks again later.
    Unknown,
}

/// Run one `txn` command.
pub async fn run(command: TxnCommand) -> Result<()> {
    match command {
        TxnCommand::Begin {
            conn,
            topic,
            key,
            group,
            body,
            json,
        } => {
            let client = conn.connect().await?;
            let msg = Message::new(body).with_key(&key);
            let t = client
                .send_half(&topic, &msg, &group, HalfOptions::default())
                .await?;
            if json {
                json_line(&serde_json::json!({"txn_id": t.0, "topic": topic, "key": key}));
            } else {
                println_flush(&format!("half message written: transaction {t} (pending)"));
            }
        }
        // With several addresses the client follows the leader; an outcome made again (its
        // first answer lost with a leader) finds the same outcome recorded and does nothing.
        TxnCommand::Commit(TxnIdArgs { conn, id }) => {
            conn.connect().await?.commit(TxnId(id)).await?;
            println_flush(&format!("transaction {id} committed"));
        }
        TxnCommand::Rollback(TxnIdArgs { conn, id }) => {
            conn.connect().await?.rollback(TxnId(id)).await?;
            println_flush(&format!("transaction {id} rolled back"));
        }
        TxnCommand::Rearm(TxnIdArgs { conn, id }) => {
            conn.connect().await?.rearm(TxnId(id)).await?;
            println_flush(&format!("transaction {id} will be checked again now"));
        }
        TxnCommand::List { conn, state, json } => list(conn, state, json).await?,
        TxnCommand::Checker {
            conn,
            group,
            answer,
        } => checker(conn, group, answer).await?,
    }
    Ok(())
}

async fn list(conn: ConnArgs, state: Option<StateArg>, json: bool) -> Result<()> {
    let state = state.map(|s| match s {
        StateArg::Pending => TxnState::Pending,
        StateArg::Unresolved => TxnState::Unresolved,
    });
    let list = conn.connect().await?.transactions(state).await?;
    for t in &list {
        if json {
            // Through a `Value`, as before, so that the keys come out in the same (sorted)
            // order scripts have seen.
            match serde_json::to_value(t) {
                Ok(v) => json_line(&v),
                Err(e) => eprintln!("halfmq: cannot encode: {e}"),
            }
        } else {
            println_flush(&format!(
                "{} {} topic={} key={} group={} checks={} last_answer={}",
                t.txn_id,
                t.state.as_str(),
                t.topic,
                t.key,
                t.producer_group,
                t.checks,
                t.last_answer.as_deref().unwrap_or("-")
            ));
        }
    }
    if !json && list.is_empty() {
        println_flush("no unfinished transactions");
    }
    Ok(())
}

/// Answer every check-back of `group` with `answer` until Ctrl-C, reconnecting (and so
/// registering again) when the connection is lost. With several `--addr`s (a replicated
/// cluster) it registers on the leader, and after a failover on the new one.
async fn checker(conn: ConnArgs, group: String, answer: AnswerArg) -> Result<()> {
    let answer = match answer {
        AnswerArg::Commit => CheckAnswer::Commit,
        AnswerArg::Rollback => CheckAnswer::Rollback,
        AnswerArg::Unknown => CheckAnswer::Unknown,
    };
    let client = conn.connect_following().await?;
    client
        .register_checker(
            &group,
            Arc::new(move |h: &HalfMessage| {
                eprintln!(
                    "check-back for transaction {} (key {}): answering {answer:?}",
                    h.txn_id, h.key
                );
                answer
            }),
        )
        .await?;
    println_flush(&format!(
        "answering check-backs of group {group} with {answer:?}; Ctrl-C stops"
    ));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = client.closed() => {
                eprintln!("halfmq: connection lost; reconnecting");
                // Any request reconnects (with backoff) and registers the checker again.
                while let Err(e) = client.topics().await {
                    eprintln!("halfmq: still not connected: {e}");
                }
            }
        }
    }
}
