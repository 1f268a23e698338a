//! Regrouping a byte stream into fixed-size pieces: what both ends of a blob transfer
//! send (a store streams bytes in whatever pieces its backend returns).

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

/// Regroup a byte stream into pieces of exactly `size` bytes (the last one may be
/// shorter), without copying pieces that are already large enough. An error is passed
/// on at once (bytes held back are dropped: they are untrusted) and ends the stream.
pub fn rechunk<S, E>(inner: S, size: usize) -> impl Stream<Item = Result<Bytes, E>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Send,
{
    struct State<S> {
        inner: S,
        head: Bytes,
        buf: BytesMut,
        done: bool,
    }
    let state = State {
        inner,
        head: Bytes::new(),
        buf: BytesMut::new(),
        done: false,
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            if !st.head.is_empty() {
                if st.buf.is_empty() && st.head.len() >= size {
                    let piece = st.head.split_to(size);
                    return Some((Ok(piece), st));
                }
                if st.buf.capacity() == 0 {
                    st.buf.reserve(size);
                }
                let take = (size - st.buf.len()).min(st.head.len());
                st.buf.extend_from_slice(&st.head.split_to(take));
                if st.buf.len() == size {
                    let piece = st.buf.split().freeze();
                    return Some((Ok(piece), st));
                }
                continue;
            }
            if st.done {
                if st.buf.is_empty() {
                    return None;
                }
                let piece = st.buf.split().freeze();
                return Some((Ok(piece), st));
            }
            match st.inner.next().await {
                Some(Ok(bytes)) => st.head = bytes,
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    return Some((Err(e), st));
                }
                None => st.done = true,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    #[tokio::test]
    async fn rechunk_regroups_without_losing_bytes() {
        let pieces: Vec<Result<Bytes, ()>> = [0usize, 3, 10, 1, 0, 25, 4]
            .iter()
            .enumerate()
            .map(|(i, &n)| Ok(Bytes::from(vec![i as u8; n])))
            .collect();
        let all: Vec<u8> = pieces
            .iter()
            .flat_map(|p| p.as_ref().unwrap().to_vec())
            .collect();
        let out: Vec<Bytes> = rechunk(futures::stream::iter(pieces), 8)
            .try_collect()
            .await
            .unwrap();
        assert!(out[..out.len() - 1].iter().all(|b| b.len() == 8));
        assert_eq!(out.concat(), all);

        let with_error = futures::stream::iter(vec![Ok(Bytes::from_static(b"abc")), Err(())]);
        let out: Vec<Result<Bytes, ()>> = rechunk(with_error, 8).collect().await;
        assert_eq!(out, vec![Err(())]);
    }
}
