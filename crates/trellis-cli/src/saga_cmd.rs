//! `trellis saga ls|show`: the coordinator's sagas, from its API.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use trellis_saga::api::v1::{
    GetSagaRequest, ListSagasRequest, Saga, Status, saga_service_client::SagaServiceClient,
};

/// `trellis saga …`.
#[derive(Subcommand)]
pub enum SagaCommand {
    /// List sagas, newest first.
    Ls {
        /// Only sagas in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i32,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
    /// One saga, step by step: what was called, how often, when, and what
    /// the last failed call said.
    Show {
        /// Its global id.
        gid: String,
        #[command(flatten)]
        coordinator: CoordinatorArg,
    },
}

/// A saga's state, on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum State {
    /// A message prepared, not yet submitted.
    Prepared,
    /// Running its steps forward.
    Running,
    /// TCC: confirming.
    Confirming,
    /// Undoing them.
    Compensating,
    /// Every step succeeded.
    Succeeded,
    /// Undone.
    Compensated,
    /// A message whose local transaction did not commit.
    Aborted,
}

/// Where the coordinator is.
#[derive(Args)]
pub struct CoordinatorArg {
    /// The coordinator's address (`trellis up`: base port + 3).
    #[arg(long, default_value = "127.0.0.1:8083")]
    coordinator: String,
    /// With mutual TLS (`trellis up --tls`): the CA, and this client's
    /// certificate and key (e.g. DATA_DIR/certs/ca.pem, saga.pem, saga-key.pem).
    #[arg(long, requires_all = ["cert_file", "key_file"])]
    ca_file: Option<PathBuf>,
    #[arg(long, requires = "ca_file")]
    cert_file: Option<PathBuf>,
    #[arg(long, requires = "ca_file")]
    key_file: Option<PathBuf>,
}

impl CoordinatorArg {
    fn client(&self) -> Result<SagaServiceClient<tonic::transport::Channel>, String> {
        let mut config = trellis::transport::ClientConfig::default();
        let target = self.coordinator.clone();
        if let Some(ca) = &self.ca_file {
            let tls = trellis::stack::ClientTlsSettings {
                ca_file: ca.clone(),
                cert_file: self.cert_file.clone(),
                key_file: self.key_file.clone(),
                reload_interval: std::time::Duration::from_secs(3600),
            };
            // The TLS connector speaks TLS whatever the scheme says.
            config.tls = Some(tls.follow().map_err(|e| e.to_string())?);
        }
        let channel =
            trellis::transport::connect_lazy(&target, &config).map_err(|e| e.to_string())?;
        Ok(SagaServiceClient::new(channel))
    }
}

/// Runs a `trellis saga` command.
pub async fn run(command: SagaCommand) -> Result<(), String> {
    match command {
        SagaCommand::Ls {
            state,
            limit,
            coordinator,
        } => {
            let status = match state {
                None => Status::Unspecified,
                Some(State::Prepared) => Status::Prepared,
                Some(State::Running) => Status::Running,
                Some(State::Confirming) => Status::Confirming,
                Some(State::Aborted) => Status::Aborted,
                Some(State::Compensating) => Status::Compensating,
                Some(State::Succeeded) => Status::Succeeded,
                Some(State::Compensated) => Status::Compensated,
            };
            let sagas = coordinator
                .client()?
                .list_sagas(ListSagasRequest {
                    status: status as i32,
                    page_size: limit,
                })
                .await
                .map_err(|s| format!("{}: {}", coordinator.coordinator, s.message()))?
                .into_inner()
                .sagas;
            print!("{}", list(&sagas));
            Ok(())
        }
        SagaCommand::Show { gid, coordinator } => {
            let saga = coordinator
                .client()?
                .get_saga(GetSagaRequest { gid })
                .await
                .map_err(|s| format!("{}: {}", coordinator.coordinator, s.message()))?
                .into_inner();
            print!("{}", show(&saga));
            Ok(())
        }
    }
}

fn status_name(status: i32) -> &'static str {
    match Status::try_from(status) {
        Ok(Status::Prepared) => "prepared",
        Ok(Status::Running) => "running",
        Ok(Status::Confirming) => "confirming",
        Ok(Status::Aborted) => "aborted",
        Ok(Status::Compensating) => "compensating",
        Ok(Status::Succeeded) => "succeeded",
        Ok(Status::Compensated) => "compensated",
        _ => "unknown",
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| trellis::telemetry::rfc3339(t.seconds, u32::try_from(t.nanos / 1000).unwrap_or(0)))
        .unwrap_or_else(|| "-".into())
}

/// `ls`'s table.
fn list(sagas: &[Saga]) -> String {
    let mut out = format!(
        "{:<48} {:<13} {:>5}  {:<27} {}\n",
        "GID", "STATUS", "STEPS", "CREATED", "FAILURE"
    );
    for s in sagas {
        let done = s.steps.iter().filter(|st| st.succeeded).count();
        let failure = if s.failed_step.is_empty() {
            String::new()
        } else {
            format!("{}: {}", s.failed_step, s.failure_reason)
        };
        out.push_str(&format!(
            "{:<48} {:<13} {:>5}  {:<27} {}\n",
            s.gid,
            status_name(s.status),
            format!("{done}/{}", s.steps.len()),
            time(s.create_time.as_ref()),
            failure
        ));
    }
    out
}

/// `show`'s report.
fn show(s: &Saga) -> String {
    let kind = match trellis_saga::api::v1::Kind::try_from(s.kind) {
        Ok(trellis_saga::api::v1::Kind::Tcc) => "tcc",
        Ok(trellis_saga::api::v1::Kind::Msg) => "msg",
        _ => "saga",
    };
    let mut out = format!(
        "saga     {} ({kind})\nstatus   {}\ncreated  {}\nupdated  {}\n",
        s.gid,
        status_name(s.status),
        time(s.create_time.as_ref()),
        time(s.update_time.as_ref()),
    );
    if s.next_attempt_time.is_some() {
        out.push_str(&format!(
            "next     {}\n",
            time(s.next_attempt_time.as_ref())
        ));
    }
    if !s.failed_step.is_empty() {
        out.push_str(&format!(
            "failed   at {}: {}\n",
            s.failed_step, s.failure_reason
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:<12} {:>8}  {:<27} {}\n",
        "STEP", "STATE", "ATTEMPTS", "LAST ATTEMPT", "LAST ERROR"
    ));
    for st in &s.steps {
        let state = match (st.called, st.succeeded, st.confirmed, st.compensated) {
            (_, _, _, true) => "compensated",
            (_, _, true, false) => "confirmed",
            (_, true, false, false) => "succeeded",
            (true, false, false, false) => "called",
            (false, false, false, false) => "not called",
        };
        out.push_str(&format!(
            "{:<16} {:<12} {:>8}  {:<27} {}\n",
            st.name,
            state,
            st.attempts,
            time(st.last_attempt_time.as_ref()),
            st.last_error
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_saga::api::v1::StepState;

    #[test]
    fn show_names_each_step_and_the_failure() {
        let saga = Saga {
            gid: "order-1".into(),
            status: Status::Compensated as i32,
            steps: vec![
                StepState {
                    name: "reserve".into(),
                    called: true,
                    succeeded: true,
                    compensated: true,
                    attempts: 2,
                    ..Default::default()
                },
                StepState {
                    name: "charge".into(),
                    called: true,
                    attempts: 1,
                    last_error: "payment: FailedPrecondition: insufficient funds".into(),
                    ..Default::default()
                },
            ],
            failed_step: "charge".into(),
            failure_reason: "payment: FailedPrecondition: insufficient funds".into(),
            ..Default::default()
        };
        let text = show(&saga);
        assert!(text.contains("status   compensated"), "{text}");
        assert!(text.contains("failed   at charge: payment"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("reserve") && l.contains("compensated")),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l.starts_with("charge")
                && l.contains("called")
                && l.contains("insufficient funds")),
            "{text}"
        );
        let table = list(std::slice::from_ref(&saga));
        assert!(
            table.contains("order-1") && table.contains("1/2"),
            "{table}"
        );
    }
}
