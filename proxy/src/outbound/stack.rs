//! The shape of a destination's stack: every policy layer is a `Step` that gets each request and
//! the rest of the stack below it, and the bottom is a `Leaf`, so a module holds only what its
//! concern does. Stacks are written top-down with [`Layers`], in the order requests go through
//! them.
//!
//! Every `Leaf` is always ready (it picks or dials when called), so a `Step` may call `next`
//! without awaiting `poll_ready`.

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
    /// What this layer is, for the description of a stack.
    fn name(&self) -> &'static str;

    /// Handles `request`, usually by calling `next` (the rest of the stack) once or more.
    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture;
}

/// The bottom of a stack: handles a request without a layer below it.
pub trait Leaf: Clone + Send + Sync + 'static {
    fn name(&self) -> &'static str;

    fn call(&self, request: Request<Body>) -> ResponseFuture;
}

/// A stack in the making, written top-down: the first step pushed is the first a request meets.
#[derive(Default)]
pub struct Layers {
    steps: Vec<Box<dyn FnOnce(Stack) -> Stack>>,
    names: Vec<&'static str>,
}

/// A stack and the names of its parts, top-down.
pub struct Built {
    pub stack: Stack,
    pub names: Vec<&'static str>,
}

impl Layers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `step` below the steps pushed before it.
    pub fn push(mut self, step: impl Step) -> Self {
        self.names.push(step.name());
        self.steps.push(Box::new(move |next| layer(step, next)));
        self
    }

    /// Pushes `step` when there is one (its policy is on).
    pub fn push_if(self, step: Option<impl Step>) -> Self {
        match step {
            Some(step) => self.push(step),
            None => self,
        }
    }

    /// The steps over `leaf`.
    pub fn over(self, leaf: impl Leaf) -> Built {
        let name = leaf.name();
        self.over_stack(Built {
            stack: Stack::new(LeafService(leaf)),
            names: vec![name],
        })
    }

    /// The steps over a stack built before.
    pub fn over_stack(self, below: Built) -> Built {
        let stack = self
            .steps
            .into_iter()
            .rev()
            .fold(below.stack, |next, put_on| put_on(next));
        let mut names = self.names;
        names.extend(below.names);
        Built { stack, names }
    }
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
fn layer(step: impl Step, next: Stack) -> Stack {
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::http::body::full;

    /// Notes its name in `seen` as a request passes.
    #[derive(Clone)]
    struct Note {
        name: &'static str,
        seen: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Step for Note {
        fn name(&self) -> &'static str {
            self.name
        }

        fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
            self.seen.lock().unwrap().push(self.name);
            tower::Service::call(next, request)
        }
    }

    impl Leaf for Note {
        fn name(&self) -> &'static str {
            self.name
        }

        fn call(&self, _: Request<Body>) -> ResponseFuture {
            self.seen.lock().unwrap().push(self.name);
            Box::pin(async { Ok(Response::new(full(""))) })
        }
    }

    #[tokio::test]
    async fn requests_meet_the_steps_in_the_order_they_were_pushed() {
        let seen = Arc::default();
        let note = |name| Note {
            name,
            seen: Arc::clone(&seen),
        };
        let below = Layers::new().push(note("c")).over(note("leaf"));
        let built = Layers::new()
            .push(note("a"))
            .push_if(None::<Note>)
            .push_if(Some(note("b")))
            .over_stack(below);
        assert_eq!(built.names, ["a", "b", "c", "leaf"]);
        let mut stack = built.stack;
        tower::Service::call(&mut stack, Request::new(full("")))
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["a", "b", "c", "leaf"]);
    }
}
