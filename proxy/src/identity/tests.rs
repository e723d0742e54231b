//! Certification and renewal against a certificate authority of the test's own, on paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outrigger_api::identity::SpiffeId;
use outrigger_api::proto::{CertifyRequest, CertifyResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::sync::watch;
use tokio::time::Instant;

use super::*;
use crate::metrics::RenewalLabels;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

pub(crate) fn reviews() -> SpiffeId {
    SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: "reviews".into(),
    }
}

/// Another identity of the same namespace, for reviews' callers.
pub(crate) fn productpage() -> SpiffeId {
    SpiffeId {
        service_account: "productpage".into(),
        ..reviews()
    }
}

/// How the test's authority answers the next request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Answer {
    Sign,
    Fail,
    /// A certificate for a key other than the one of the request.
    SignAnotherKey,
}

/// A CA that signs what it is asked, for a day from now by the wall clock, after the failures
/// it was told to give.
pub(crate) struct TestAuthority {
    issuer: Issuer<'static, KeyPair>,
    anchor: CertificateDer<'static>,
    /// The anchor, as the injector hands it to a proxy.
    pub(crate) anchor_pem: String,
    answers: Mutex<Vec<Answer>>,
    /// When each request came, and its token.
    pub(crate) requests: Mutex<Vec<(Instant, String)>>,
}

impl TestAuthority {
    /// Answers with `answers` in turn, then signs.
    pub(crate) fn new(answers: &[Answer]) -> Arc<Self> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let anchor = params.self_signed(&key).unwrap();
        let (anchor_pem, anchor) = (anchor.pem(), anchor.der().clone());
        let mut answers = answers.to_vec();
        answers.reverse();
        Arc::new(Self {
            issuer: Issuer::new(params, key),
            anchor,
            anchor_pem,
            answers: Mutex::new(answers),
            requests: Mutex::default(),
        })
    }

    fn sign(&self, csr: &[u8], answer: Answer) -> CertifyResponse {
        let mut request =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .unwrap();
        if answer == Answer::SignAnotherKey {
            let other = KeyPair::generate().unwrap();
            let other = CertificateParams::default()
                .serialize_request(&other)
                .unwrap();
            request.public_key = CertificateSigningRequestParams::from_der(other.der())
                .unwrap()
                .public_key;
        }
        let now = wall_clock_since_epoch();
        let not_after = now + DAY;
        request.params.not_before = (std::time::UNIX_EPOCH + now).into();
        request.params.not_after = (std::time::UNIX_EPOCH + not_after).into();
        request.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = request.signed_by(&self.issuer).unwrap();
        CertifyResponse {
            chain_der: vec![leaf.der().to_vec()],
            trust_anchors_der: vec![self.anchor.to_vec()],
            valid_until_unix_seconds: not_after.as_secs() as i64,
        }
    }
}

impl CertificateAuthority for Arc<TestAuthority> {
    async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, tonic::Status> {
        self.requests
            .lock()
            .unwrap()
            .push((Instant::now(), request.token.clone()));
        let answer = self.answers.lock().unwrap().pop().unwrap_or(Answer::Sign);
        match answer {
            Answer::Fail => Err(tonic::Status::unavailable("the test says no")),
            answer => Ok(self.sign(&request.csr_der, answer)),
        }
    }
}

/// A running identity task with its token file.
struct Running {
    held: Held,
    metrics: Metrics,
    authority: Arc<TestAuthority>,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

fn start(answers: &[Answer], with_token: bool) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    if with_token {
        std::fs::write(&token_file, "the-token\n").unwrap();
    }
    let authority = TestAuthority::new(answers);
    let metrics = Metrics::new();
    let (held_tx, held) = watch::channel(None);
    let (stop, shutdown) = watch::channel(false);
    let settings = IdentitySettings {
        id: reviews(),
        token_file: token_file.clone(),
    };
    tokio::spawn(run(
        settings,
        authority.clone(),
        metrics.clone(),
        held_tx,
        shutdown,
    ));
    Running {
        held,
        metrics,
        authority,
        token_file,
        _dir: dir,
        _stop: stop,
    }
}

fn renewals(metrics: &Metrics, result: RenewalResult) -> u64 {
    metrics
        .identity_renewals
        .get_or_create(&RenewalLabels { result })
        .get()
}

async fn next_identity(held: &mut Held) -> Arc<CertifiedIdentity> {
    held.changed().await.unwrap();
    held.borrow_and_update().clone().expect("an identity")
}

#[tokio::test(start_paused = true)]
async fn a_certificate_is_renewed_at_70_percent_of_its_life_with_a_new_key() {
    let mut running = start(&[], true);
    let first = next_identity(&mut running.held).await;
    let certified_at = Instant::now();
    assert_eq!(first.id, reviews());
    assert_eq!(
        running.metrics.identity_cert_expiry.get(),
        first.valid_until as i64
    );
    assert_eq!(renewals(&running.metrics, RenewalResult::Success), 1);
    assert_eq!(
        running.authority.requests.lock().unwrap()[0].1,
        "the-token",
        "the token as the file holds it, without the newline"
    );

    let second = next_identity(&mut running.held).await;
    let renewed_after = certified_at.elapsed();
    let expected = DAY.mul_f64(RENEW_AT);
    assert!(
        renewed_after.abs_diff(expected) < Duration::from_secs(60),
        "renewed after {renewed_after:?}, not about {expected:?}"
    );
    assert_eq!(renewals(&running.metrics, RenewalResult::Success), 2);
    assert_ne!(
        first.certified_key.cert[0], second.certified_key.cert[0],
        "a new certificate"
    );
    assert_ne!(
        first.certified_key.key.public_key(),
        second.certified_key.key.public_key(),
        "for a new key"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_certification_is_counted_and_retried_with_backoff() {
    let mut running = start(&[Answer::Fail, Answer::Fail, Answer::Fail], true);
    let started = Instant::now();
    next_identity(&mut running.held).await;
    assert_eq!(renewals(&running.metrics, RenewalResult::Failure), 3);
    assert_eq!(renewals(&running.metrics, RenewalResult::Success), 1);
    let requests = running.authority.requests.lock().unwrap().clone();
    let gaps: Vec<Duration> = requests.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // Doubling from one second, each at least half its step.
    for (gap, step) in gaps.iter().zip([1, 2, 4]) {
        let step = Duration::from_secs(step);
        assert!(
            (step / 2..=step).contains(gap),
            "gaps {gaps:?}, requests from {started:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_token_is_a_failure_until_the_kubelet_writes_it() {
    let mut running = start(&[], false);
    while renewals(&running.metrics, RenewalResult::Failure) < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running.held.borrow().is_none());
    assert!(running.authority.requests.lock().unwrap().is_empty());
    std::fs::write(&running.token_file, "the-token").unwrap();
    next_identity(&mut running.held).await;
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_key_is_refused_and_asked_again() {
    let mut running = start(&[Answer::SignAnotherKey], true);
    let identity = next_identity(&mut running.held).await;
    assert_eq!(renewals(&running.metrics, RenewalResult::Failure), 1);
    assert_eq!(running.authority.requests.lock().unwrap().len(), 2);
    identity.certified_key.keys_match().unwrap();
}

#[tokio::test]
async fn the_csr_asks_for_the_spiffe_id_alone() {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let request = csr(&reviews(), &key).unwrap();
    let parsed = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
        &request[..],
    ))
    .unwrap();
    assert_eq!(
        parsed.params.subject_alt_names,
        [SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/reviews"
                .try_into()
                .unwrap()
        )]
    );
}

/// An identity signed by a fresh test authority.
pub(crate) async fn certified() -> CertifiedIdentity {
    certified_by(&TestAuthority::new(&[]), reviews()).await
}

/// `id`, signed by `authority`.
pub(crate) async fn certified_by(
    authority: &Arc<TestAuthority>,
    id: SpiffeId,
) -> CertifiedIdentity {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "the-token").unwrap();
    let settings = IdentitySettings { id, token_file };
    certify(&settings, authority).await.unwrap()
}
