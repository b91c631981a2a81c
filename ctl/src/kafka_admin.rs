//! `chatctl acls` and `chatctl kafka-users`: a deployment's Kafka ACLs and SCRAM users.
//!
//! The rdkafka crate wraps librdkafka's admin API for topics and configs, not for ACLs or SCRAM
//! credentials; librdkafka itself has both (`rd_kafka_CreateAcls`, `rd_kafka_DescribeAcls`,
//! `rd_kafka_AlterUserScramCredentials`), and it is linked already. This module calls them
//! through the bindings rdkafka re-exports, on the native handle of an rdkafka admin client (so
//! the connection, TLS and SASL settings are the project's usual ones). It is the project's only
//! `unsafe` code; every pointer it gets from librdkafka is freed on every path by a guard.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context};
use chat_common::ids::GatewayId;
use chat_common::kafka::KafkaConfig;
use chat_common::topics::TopicNames;
use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;

/// How long an admin request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Topic,
    Group,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Literal,
    Prefixed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
    Describe,
}

/// One ALLOW entry: `User:<user>` may do `operation` on the resources `name` matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    pub user: String,
    pub resource: Resource,
    pub pattern: Pattern,
    pub name: String,
    pub operation: Operation,
}

impl Acl {
    /// As [`list_acls`] prints it.
    fn listed(&self) -> String {
        let shown = self.to_string();
        // "User:u OP RES PAT name" -> "User:u ALLOW OP RES PAT name"
        match shown.split_once(' ') {
            Some((principal, rest)) => format!("{principal} ALLOW {rest}"),
            None => shown,
        }
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.operation {
            Operation::Read => "READ",
            Operation::Write => "WRITE",
            Operation::Describe => "DESCRIBE",
        };
        let res = match self.resource {
            Resource::Topic => "TOPIC",
            Resource::Group => "GROUP",
        };
        let pat = match self.pattern {
            Pattern::Literal => "LITERAL",
            Pattern::Prefixed => "PREFIXED",
        };
        write!(f, "User:{} {op} {res} {pat} {}", self.user, self.name)
    }
}

/// The ACLs of one deployment (topics under `names`' prefix, the given gateways): what each
/// service's user may do, and nothing more.
///
/// - `gateway-<id>` writes `inbound` and `presence`, reads `presence` (it closes the sessions a
///   user opened elsewhere) and its own `outbound-<id>` in its group `<prefix>gateway-<id>`;
///   nothing of another gateway's.
/// - `multiplexer` reads `inbound` in `multiplexer_group` and `presence`, writes every
///   `outbound-*` (a prefixed ACL: gateways added later included) and `inbound-dlq`.
/// - `data` reads every topic of the deployment (a prefixed ACL; with no prefix, every topic of
///   the cluster), in groups `<prefix>data-*`; writes nothing.
///
/// The admin user is a super user of the broker and needs none. The readers that assign
/// partitions by hand (presence, `chatctl tail`) need no group either (see
/// `chat_common::kafka::read_next`).
pub fn deployment_acls(
    names: &TopicNames,
    gateways: &[GatewayId],
    multiplexer_group: &str,
) -> Vec<Acl> {
    use Operation::*;
    use Pattern::*;
    use Resource::*;
    let mut a = AclList::default();
    let prefix = names.prefix();
    for id in gateways {
        let (user, id) = (format!("gateway-{}", id.as_str()), id.as_str());
        a.allow(&user, Topic, Literal, names.inbound(), &[Write, Describe]);
        a.allow(
            &user,
            Topic,
            Literal,
            names.presence(),
            &[Write, Read, Describe],
        );
        a.allow(
            &user,
            Topic,
            Literal,
            format!("{prefix}outbound-{id}"),
            &[Read, Describe],
        );
        a.allow(
            &user,
            Group,
            Literal,
            format!("{prefix}gateway-{id}"),
            &[Read],
        );
    }
    let mux = "multiplexer";
    a.allow(mux, Topic, Literal, names.inbound(), &[Read, Describe]);
    a.allow(mux, Topic, Literal, names.presence(), &[Read, Describe]);
    a.allow(mux, Topic, Literal, names.inbound_dlq(), &[Write, Describe]);
    a.allow(
        mux,
        Topic,
        Prefixed,
        format!("{prefix}outbound-"),
        &[Write, Describe],
    );
    a.allow(mux, Group, Literal, multiplexer_group.to_owned(), &[Read]);
    // An empty prefix makes these the whole cluster's topics: the data team then reads
    // everything on it, which is what a cluster of one deployment means.
    match prefix {
        "" => a.allow("data", Topic, Literal, "*".to_owned(), &[Read, Describe]),
        p => a.allow("data", Topic, Prefixed, p.to_owned(), &[Read, Describe]),
    }
    a.allow("data", Group, Prefixed, format!("{prefix}data-"), &[Read]);
    a.0
}

#[derive(Default)]
struct AclList(Vec<Acl>);

impl AclList {
    fn allow(
        &mut self,
        user: &str,
        resource: Resource,
        pattern: Pattern,
        name: String,
        ops: &[Operation],
    ) {
        for &operation in ops {
            self.0.push(Acl {
                user: user.to_owned(),
                resource,
                pattern,
                name: name.clone(),
                operation,
            });
        }
    }
}

/// An admin client of the brokers, for its native handle.
fn admin(kafka: &KafkaConfig) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    kafka
        .client_config()
        .create()
        .with_context(|| format!("connecting to {}", kafka.brokers))
}

/// Creates `acls` (an ACL that exists already is left as it is).
pub fn create_acls(kafka: &KafkaConfig, acls: &[Acl]) -> anyhow::Result<()> {
    let client = admin(kafka)?;
    let rk = client.inner().native_ptr();
    let mut bindings = Bindings(Vec::with_capacity(acls.len()));
    for acl in acls {
        bindings.0.push(acl_binding(acl)?);
    }
    let event = Request::new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_CREATEACLS)?.run(
        |options, queue| unsafe {
            rd::rd_kafka_CreateAcls(
                rk,
                bindings.0.as_mut_ptr(),
                bindings.0.len(),
                options,
                queue,
            )
        },
    )?;
    let mut n = 0usize;
    // SAFETY: the event is a CreateAcls result (checked by `run`); the array and its entries
    // live as long as the event.
    let errors: Vec<(String, String)> = unsafe {
        let result = rd::rd_kafka_event_CreateAcls_result(event.0);
        let list = rd::rd_kafka_CreateAcls_result_acls(result, &mut n);
        (0..n)
            .map(|i| error_text(rd::rd_kafka_acl_result_error(*list.add(i))))
            .zip(acls)
            .filter_map(|(e, acl)| Some((acl.to_string(), e?)))
            .collect()
    };
    refused("ACLs", acls.len(), errors)?;
    // The controller has them; a broker enforces them once it has applied the metadata log up
    // to them, a moment later. Return only then, so that a service started right after finds
    // its rights (a multiplexer started at once was refused its dead-letter topic).
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let held: std::collections::HashSet<String> =
            describe(&client, None)?.into_iter().collect();
        let missing = acls.iter().filter(|a| !held.contains(&a.listed())).count();
        if missing == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{missing} of the ACLs created are not in force on the broker after {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ACLs the brokers hold for `user` (every user when `None`), as the broker describes them.
pub fn list_acls(kafka: &KafkaConfig, user: Option<&str>) -> anyhow::Result<Vec<String>> {
    describe(&admin(kafka)?, user)
}

/// [`list_acls`] on a client already connected.
fn describe(
    client: &AdminClient<DefaultClientContext>,
    user: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let rk = client.inner().native_ptr();
    let principal = user.map(|u| cstring(&format!("User:{u}"))).transpose()?;
    let mut errstr = [0 as c_char; 512];
    // SAFETY: the strings outlive the call; the filter is destroyed by the guard.
    let filter = Binding(unsafe {
        rd::rd_kafka_AclBindingFilter_new(
            rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_ANY,
            std::ptr::null(),
            rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_ANY,
            principal.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
            std::ptr::null(),
            rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_ANY,
            rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ANY,
            errstr.as_mut_ptr(),
            errstr.len(),
        )
    });
    if filter.0.is_null() {
        bail!("ACL filter: {}", c_text(errstr.as_ptr()));
    }
    let event = Request::new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBEACLS)?
        .run(|options, queue| unsafe { rd::rd_kafka_DescribeAcls(rk, filter.0, options, queue) })?;
    let mut n = 0usize;
    // SAFETY: a DescribeAcls result; the bindings live as long as the event.
    let mut lines: Vec<String> = unsafe {
        let result = rd::rd_kafka_event_DescribeAcls_result(event.0);
        let list = rd::rd_kafka_DescribeAcls_result_acls(result, &mut n);
        (0..n)
            .map(|i| {
                let b = *list.add(i);
                format!(
                    "{} {} {} {} {} {}",
                    c_text(rd::rd_kafka_AclBinding_principal(b)),
                    c_text(rd::rd_kafka_AclPermissionType_name(
                        rd::rd_kafka_AclBinding_permission_type(b)
                    )),
                    c_text(rd::rd_kafka_AclOperation_name(
                        rd::rd_kafka_AclBinding_operation(b)
                    )),
                    c_text(rd::rd_kafka_ResourceType_name(
                        rd::rd_kafka_AclBinding_restype(b)
                    )),
                    c_text(rd::rd_kafka_ResourcePatternType_name(
                        rd::rd_kafka_AclBinding_resource_pattern_type(b)
                    )),
                    c_text(rd::rd_kafka_AclBinding_name(b)),
                )
            })
            .collect()
    };
    lines.sort();
    Ok(lines)
}

/// A change to one user's SCRAM credential.
pub enum UserChange<'a> {
    /// Create the user or set a new password (SCRAM-SHA-512; the broker stores a salted hash).
    Set { password: &'a str, iterations: i32 },
    /// Remove the user's SCRAM-SHA-512 credential: it can no longer log in.
    Delete,
}

/// Creates, updates or deletes `user`'s SCRAM-SHA-512 credential.
pub fn alter_user(kafka: &KafkaConfig, user: &str, change: UserChange<'_>) -> anyhow::Result<()> {
    let client = admin(kafka)?;
    let rk = client.inner().native_ptr();
    let name = cstring(user)?;
    let mechanism = rd::rd_kafka_ScramMechanism_t::RD_KAFKA_SCRAM_MECHANISM_SHA_512;
    // SAFETY: the strings outlive the call (librdkafka copies them); a null salt makes
    // librdkafka draw a random one.
    let mut alteration = unsafe {
        match change {
            UserChange::Set {
                password,
                iterations,
            } => rd::rd_kafka_UserScramCredentialUpsertion_new(
                name.as_ptr(),
                mechanism,
                iterations,
                password.as_ptr(),
                password.len(),
                std::ptr::null(),
                0,
            ),
            UserChange::Delete => {
                rd::rd_kafka_UserScramCredentialDeletion_new(name.as_ptr(), mechanism)
            }
        }
    };
    if alteration.is_null() {
        bail!("librdkafka refused the SCRAM change for {user}");
    }
    let event = Request::new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_ALTERUSERSCRAMCREDENTIALS,
    )
    .and_then(|r| {
        r.run(|options, queue| unsafe {
            rd::rd_kafka_AlterUserScramCredentials(rk, &mut alteration, 1, options, queue)
        })
    });
    // SAFETY: the alteration is ours to free, whatever the request did.
    unsafe { rd::rd_kafka_UserScramCredentialAlteration_destroy(alteration) };
    let event = event?;
    let mut n = 0usize;
    // SAFETY: an AlterUserScramCredentials result; its responses live as long as the event.
    let errors: Vec<(String, String)> = unsafe {
        let result = rd::rd_kafka_event_AlterUserScramCredentials_result(event.0);
        let list = rd::rd_kafka_AlterUserScramCredentials_result_responses(result, &mut n);
        (0..n)
            .filter_map(|i| {
                let e = error_text(
                    rd::rd_kafka_AlterUserScramCredentials_result_response_error(*list.add(i)),
                )?;
                Some((user.to_owned(), e))
            })
            .collect()
    };
    refused("SCRAM credential changes", 1, errors)
}

/// An error naming what of `total` items the brokers refused (one line per distinct reason,
/// with the first item it concerned: a refusal of the whole request repeats for every item).
fn refused(what: &str, total: usize, errors: Vec<(String, String)>) -> anyhow::Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let mut reasons: Vec<(String, String, usize)> = Vec::new();
    for (item, reason) in &errors {
        match reasons.iter_mut().find(|(r, _, _)| r == reason) {
            Some((_, _, n)) => *n += 1,
            None => reasons.push((reason.clone(), item.clone(), 1)),
        }
    }
    let lines: Vec<String> = reasons
        .into_iter()
        .map(|(reason, first, n)| {
            // The broker's messages can quote whole request objects before what matters (at
            // the end: "... needs ALTER permission. (CLUSTER_AUTHORIZATION_FAILED)").
            let chars: Vec<char> = reason.chars().collect();
            let reason: String = match chars.len() {
                n if n > 300 => "…"
                    .chars()
                    .chain(chars[n - 160..].iter().copied())
                    .collect(),
                _ => reason,
            };
            format!("{n} refused (first: {first}): {reason}")
        })
        .collect();
    bail!(
        "{} of {total} {what} refused:\n  {}",
        errors.len(),
        lines.join("\n  ")
    )
}

/// One admin request: its options and a queue of its own for the result.
struct Request {
    rk: *mut rd::rd_kafka_t,
    options: *mut rd::rd_kafka_AdminOptions_t,
}

impl Request {
    fn new(rk: *mut rd::rd_kafka_t, op: rd::rd_kafka_admin_op_t) -> anyhow::Result<Self> {
        // SAFETY: rk is the live handle of the caller's admin client.
        let options = unsafe { rd::rd_kafka_AdminOptions_new(rk, op) };
        if options.is_null() {
            bail!("librdkafka has no admin options for {op:?}");
        }
        let request = Self { rk, options };
        let mut errstr = [0 as c_char; 512];
        let ms = TIMEOUT.as_millis() as i32;
        // SAFETY: options is valid (checked above); errstr is as long as said.
        let err = unsafe {
            rd::rd_kafka_AdminOptions_set_request_timeout(
                request.options,
                ms,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            bail!("admin request timeout: {}", c_text(errstr.as_ptr()));
        }
        Ok(request)
    }

    /// Starts the request with `start(options, queue)` and waits for its result event, which is
    /// returned only when it carries no request-level error.
    fn run(
        self,
        start: impl FnOnce(*const rd::rd_kafka_AdminOptions_t, *mut rd::rd_kafka_queue_t),
    ) -> anyhow::Result<Event> {
        // SAFETY: rk is live; the queue is destroyed by its guard after the event is taken.
        let queue = Queue(unsafe { rd::rd_kafka_queue_new(self.rk) });
        start(self.options, queue.0);
        let wait = TIMEOUT + Duration::from_secs(5);
        // SAFETY: the queue is valid; a null event means nothing came within the wait.
        let event = Event(unsafe { rd::rd_kafka_queue_poll(queue.0, wait.as_millis() as i32) });
        if event.0.is_null() {
            bail!("no answer from the brokers within {wait:?}");
        }
        // SAFETY: a live event.
        unsafe {
            let err = rd::rd_kafka_event_error(event.0);
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                bail!("{}", c_text(rd::rd_kafka_event_error_string(event.0)));
            }
        }
        Ok(event)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_AdminOptions_new, freed once.
        unsafe { rd::rd_kafka_AdminOptions_destroy(self.options) }
    }
}

struct Queue(*mut rd::rd_kafka_queue_t);
impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_queue_new, freed once.
        unsafe { rd::rd_kafka_queue_destroy(self.0) }
    }
}

struct Event(*mut rd::rd_kafka_event_t);
impl Drop for Event {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: polled from a queue, freed once.
            unsafe { rd::rd_kafka_event_destroy(self.0) }
        }
    }
}

/// An ACL binding or filter of ours.
struct Binding(*mut rd::rd_kafka_AclBinding_t);
impl Drop for Binding {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by rd_kafka_AclBinding(Filter)_new, freed once.
            unsafe { rd::rd_kafka_AclBinding_destroy(self.0) }
        }
    }
}

struct Bindings(Vec<*mut rd::rd_kafka_AclBinding_t>);
impl Drop for Bindings {
    fn drop(&mut self) {
        for &b in &self.0 {
            drop(Binding(b));
        }
    }
}

fn acl_binding(acl: &Acl) -> anyhow::Result<*mut rd::rd_kafka_AclBinding_t> {
    let name = cstring(&acl.name)?;
    let principal = cstring(&format!("User:{}", acl.user))?;
    let host = cstring("*")?;
    let restype = match acl.resource {
        Resource::Topic => rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
        Resource::Group => rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_GROUP,
    };
    let pattern = match acl.pattern {
        Pattern::Literal => rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_LITERAL,
        Pattern::Prefixed => rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_PREFIXED,
    };
    let op = match acl.operation {
        Operation::Read => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_READ,
        Operation::Write => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_WRITE,
        Operation::Describe => rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_DESCRIBE,
    };
    let mut errstr = [0 as c_char; 512];
    // SAFETY: the strings outlive the call (librdkafka copies them).
    let b = unsafe {
        rd::rd_kafka_AclBinding_new(
            restype,
            name.as_ptr(),
            pattern,
            principal.as_ptr(),
            host.as_ptr(),
            op,
            rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW,
            errstr.as_mut_ptr(),
            errstr.len(),
        )
    };
    if b.is_null() {
        bail!("ACL {acl}: {}", c_text(errstr.as_ptr()));
    }
    Ok(b)
}

fn cstring(s: &str) -> anyhow::Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} holds a NUL byte"))
}

/// The text of a C string from librdkafka ("" for null).
fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: librdkafka's strings are NUL-terminated and live as long as their owner, which
    // outlives this copy.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The text of an error that librdkafka owns, `None` when there is none (a null error, or
/// one whose code is "no error": SCRAM responses carry one of those on success).
fn error_text(e: *const rd::rd_kafka_error_t) -> Option<String> {
    if e.is_null() {
        return None;
    }
    // SAFETY: a live error of a live event.
    unsafe {
        if rd::rd_kafka_error_code(e) == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        Some(format!(
            "{} ({})",
            c_text(rd::rd_kafka_error_string(e)),
            c_text(rd::rd_kafka_error_name(e))
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(id: &str) -> GatewayId {
        GatewayId::parse(id).expect("gateway id")
    }

    fn has(acls: &[Acl], user: &str, op: Operation, name: &str) -> bool {
        acls.iter().any(|a| {
            a.user == user
                && a.operation == op
                && match a.pattern {
                    Pattern::Literal => a.name == name || a.name == "*",
                    Pattern::Prefixed => name.starts_with(&a.name),
                }
        })
    }

    #[test]
    fn each_user_gets_what_its_service_needs_and_nothing_of_another_gateway() {
        let names = TopicNames::new("t1-");
        let acls = deployment_acls(&names, &[gw("gw1"), gw("gw2")], "t1-multiplexer");
        let (o1, o2) = (names.outbound(&gw("gw1")), names.outbound(&gw("gw2")));
        use Operation::*;
        assert!(has(&acls, "gateway-gw1", Write, &names.inbound()));
        assert!(has(&acls, "gateway-gw1", Read, &o1));
        assert!(!has(&acls, "gateway-gw1", Read, &o2));
        assert!(!has(&acls, "gateway-gw1", Describe, &o2));
        assert!(!has(&acls, "gateway-gw1", Write, &o1));
        assert!(!has(&acls, "gateway-gw1", Read, &names.inbound()));
        assert!(has(&acls, "multiplexer", Write, &o2));
        assert!(has(
            &acls,
            "multiplexer",
            Write,
            &names.outbound(&gw("gw9"))
        ));
        assert!(has(&acls, "multiplexer", Write, &names.inbound_dlq()));
        assert!(!has(&acls, "multiplexer", Write, &names.inbound()));
        assert!(has(&acls, "data", Read, &o1));
        assert!(!acls
            .iter()
            .any(|a| a.user == "data" && a.operation == Write));
        // Nothing reaches outside the deployment's prefix.
        assert!(acls.iter().all(|a| a.name.starts_with("t1-")));
        assert!(!has(&acls, "data", Read, "t2-inbound"));
    }

    #[test]
    fn without_a_prefix_the_data_user_reads_the_whole_cluster() {
        let acls = deployment_acls(&TopicNames::new(""), &[gw("gw1")], "multiplexer");
        assert!(has(&acls, "data", Operation::Read, "anything"));
        assert_eq!(
            acls.iter()
                .find(|a| a.user == "gateway-gw1" && a.resource == Resource::Group)
                .map(ToString::to_string)
                .as_deref(),
            Some("User:gateway-gw1 READ GROUP LITERAL gateway-gw1")
        );
        // As the broker lists it: what creating them waits for.
        let group = acls.iter().find(|a| a.resource == Resource::Group);
        assert_eq!(
            group.map(Acl::listed).as_deref(),
            Some("User:gateway-gw1 ALLOW READ GROUP LITERAL gateway-gw1")
        );
    }
}
