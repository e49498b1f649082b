//! Futures the layers share: one of two paths, without boxing either.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

pin_project_lite::pin_project! {
    /// A layer's response future on one of two paths (a fast path that is
    /// the inner future itself, and another).
    pub struct EitherFuture<A, B> {
        #[pin]
        state: Either<A, B>,
    }
}

pin_project_lite::pin_project! {
    #[project = EitherProj]
    enum Either<A, B> {
        Left { #[pin] fut: A },
        Right { #[pin] fut: B },
    }
}

impl<A, B> EitherFuture<A, B> {
    /// The first path.
    pub fn left(fut: A) -> Self {
        EitherFuture {
            state: Either::Left { fut },
        }
    }

    /// The second path.
    pub fn right(fut: B) -> Self {
        EitherFuture {
            state: Either::Right { fut },
        }
    }
}

impl<A, B> Future for EitherFuture<A, B>
where
    A: Future,
    B: Future<Output = A::Output>,
{
    type Output = A::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        match self.project().state.project() {
            EitherProj::Left { fut } => fut.poll(cx),
            EitherProj::Right { fut } => fut.poll(cx),
        }
    }
}
