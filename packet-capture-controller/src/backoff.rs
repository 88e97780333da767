//! Capped, jittered exponential backoff and a retry loop around it.

use std::future::Future;
use std::time::Duration;

/// How often and how long to retry: the n-th retry waits between half and
/// all of `min(initial * 2^n, max)` (equal jitter), and at most `retries`
/// retries follow the first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub retries: u32,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration, retries: u32) -> Self {
        Self {
            initial,
            max,
            retries,
        }
    }

    /// The ceiling of the `retry`-th delay (0-based), before jitter.
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << retry.min(20))
            .min(self.max)
    }

    /// The `retry`-th delay (0-based), jittered.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` rejects,
    /// or the retries are used up; `on_retry(retry, delay, &error)` is
    /// awaited before each wait.
    pub async fn retry<T, E, F, Fut, R>(
        &self,
        mut op: F,
        retryable: impl Fn(&E) -> bool,
        mut on_retry: impl FnMut(u32, Duration, &E) -> R,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        R: Future<Output = ()>,
    {
        let mut retry = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if retry < self.retries && retryable(&e) => {
                    let delay = self.delay(retry);
                    on_retry(retry, delay, &e).await;
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 6);

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_below_the_ceiling() {
        let ceilings: Vec<u64> = (0..6).map(|n| B.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        for n in 0..40 {
            let d = B.delay(n % 6);
            let c = B.ceiling(n % 6);
            assert!(d >= c / 2 && d <= c, "{d:?} not in [{:?}, {c:?}]", c / 2);
        }
        assert_eq!(B.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_waiting_in_between() {
        let calls = RefCell::new(0);
        let waits = RefCell::new(Vec::new());
        let start = tokio::time::Instant::now();
        let out: Result<u32, &str> = B
            .retry(
                || {
                    *calls.borrow_mut() += 1;
                    let n = *calls.borrow();
                    async move { if n < 4 { Err("unavailable") } else { Ok(n) } }
                },
                |_| true,
                |retry, delay, _| {
                    waits.borrow_mut().push((retry, delay));
                    async {}
                },
            )
            .await;
        assert_eq!(out, Ok(4));
        let waits = waits.into_inner();
        assert_eq!(waits.iter().map(|w| w.0).collect::<Vec<_>>(), [0, 1, 2]);
        let total: Duration = waits.iter().map(|w| w.1).sum();
        // The timer rounds each wait up to the millisecond.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= total && elapsed <= total + Duration::from_millis(3),
            "{elapsed:?} vs {total:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_retries_and_at_once_on_permanent_errors() {
        let calls = RefCell::new(0);
        let out: Result<(), &str> = B
            .retry(
                || {
                    *calls.borrow_mut() += 1;
                    async { Err("down") }
                },
                |_| true,
                |_, _, _| async {},
            )
            .await;
        assert_eq!(out, Err("down"));
        assert_eq!(*calls.borrow(), 7);
        *calls.borrow_mut() = 0;
        let out: Result<(), &str> = B
            .retry(
                || {
                    *calls.borrow_mut() += 1;
                    async { Err("invalid") }
                },
                |e| *e != "invalid",
                |_, _, _| async {},
            )
            .await;
        assert_eq!(out, Err("invalid"));
        assert_eq!(*calls.borrow(), 1);
    }
}
