//! The shape of a destination's stack: every policy layer is a `Step` that gets each request and
//! the rest of the stack below it, and the bottom is a `Leaf`, so a module holds only what its
//! concern does.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::util::BoxCloneSyncService;

use crate::http::body::Body;
use crate::http::error::ProxyError;

/// The rest of the stack, as a layer sees it.
pub type Stack = BoxCloneSyncService<Request<Body>, Response<Body>, ProxyError>;

/// What every part of a destination's stack returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

/// One policy, applied to one request.
pub trait Step: Clone + Send + Sync + 'static {
    /// Handles `request`, usually by calling `next` (the rest of the stack) once or more.
    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture;
}

/// The bottom of a stack: handles a request without a layer below it.
pub trait Leaf: Clone + Send + Sync + 'static {
    fn call(&self, request: Request<Body>) -> ResponseFuture;
}

/// A stack of just `leaf`.
pub fn leaf(leaf: impl Leaf) -> Stack {
    Stack::new(LeafService(leaf))
}

#[derive(Clone)]
struct LeafService<L>(L);

impl<L: Leaf> tower::Service<Request<Body>> for LeafService<L> {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        self.0.call(request)
    }
}

/// Puts `step` on top of `next`.
pub fn layer(step: impl Step, next: Stack) -> Stack {
    Stack::new(Layer { step, next })
}

#[derive(Clone)]
struct Layer<S> {
    step: S,
    next: Stack,
}

impl<S: Step> tower::Service<Request<Body>> for Layer<S> {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.next.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        self.step.call(&mut self.next, request)
    }
}
