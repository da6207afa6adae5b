//! The device wire protocol on a stream: frames read and written over QUIC
//! streams (or anything `AsyncRead`/`AsyncWrite`), each a `u32` big-endian
//! body length then the body, with the length checked before anything is
//! allocated. The messages, their codec and the version rule are the
//! engine's (`engine::frames`, re-exported here, so `proto::DeviceFrame`
//! and the rest name them); this module is the IO both ends share.

pub use crate::engine::frames::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read one frame body into `buf` (replacing its contents). `Ok(false)` when
/// the stream ended cleanly before a frame began. The claimed length is
/// checked against `max` before anything is allocated.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(false),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len);
    if len as u64 > max as u64 {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    buf.clear();
    let n = r.take(len.into()).read_to_end(buf).await?;
    if n < len as usize {
        return Err(FrameError::Truncated);
    }
    Ok(true)
}

/// Read and decode one frame; `Ok(None)` on a clean end of stream.
pub async fn read_frame<T: Frame, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let mut buf = Vec::new();
    if !read_frame_body(r, max, &mut buf).await? {
        return Ok(None);
    }
    decode(&buf).map(Some)
}

/// Bytes a [`FrameReader`] reads from its transport at once.
const READ_AHEAD: usize = 16 * 1024;

/// A frame stream read through a buffer: one read of the transport
/// usually yields several frames, so a burst costs one poll of the QUIC
/// connection rather than two or three per frame.
///
/// The buffer exists only while bytes flow: a read that finds it empty and
/// the transport with nothing to give drops it. An idle device then costs
/// the box no read buffer; a `BufReader`'s 16 KiB, held for good, was a
/// quarter of the memory each idle connected device took (issue 29).
pub struct FrameReader<R> {
    inner: R,
    buf: Option<Box<[u8]>>,
    pos: usize,
    filled: usize,
}

/// Wrap `r` for reading frames (at most 16 KiB of buffer, and none while
/// the peer is quiet).
pub fn frame_reader<R: AsyncRead>(r: R) -> FrameReader<R> {
    FrameReader {
        inner: r,
        buf: None,
        pos: 0,
        filled: 0,
    }
}

impl<R> FrameReader<R> {
    /// Bytes of buffer this reader holds now (0 while the peer is quiet).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameReader<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(buf) = this.buf.as_ref().filter(|_| this.pos < this.filled) {
            let n = out.remaining().min(this.filled - this.pos);
            out.put_slice(&buf[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        // Empty. A read as large as the buffer (a big frame's body) goes
        // straight through, without a copy.
        if out.remaining() >= READ_AHEAD {
            this.buf = None;
            return std::pin::Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let buf = this
            .buf
            .get_or_insert_with(|| vec![0; READ_AHEAD].into_boxed_slice());
        let mut into = tokio::io::ReadBuf::new(buf);
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut into) {
            Poll::Ready(Ok(())) => {
                let got = into.filled().len();
                let n = out.remaining().min(got);
                out.put_slice(&buf[..n]);
                (this.pos, this.filled) = (n, got);
                if got == 0 {
                    this.buf = None;
                }
                Poll::Ready(Ok(()))
            }
            other => {
                // Quiet (or failed): give the buffer back until bytes come.
                this.buf = None;
                (this.pos, this.filled) = (0, 0);
                other
            }
        }
    }
}

/// Encode and write one frame; refuses (without writing) a frame whose body
/// is over `max`, since the peer would only reject it.
pub async fn write_frame<T: Frame, W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &T,
    max: usize,
) -> Result<(), FrameError> {
    let mut bytes = Vec::new();
    encode_into(frame, max, &mut bytes)?;
    w.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::command::CommandId;
    use crate::engine::frames::samples::{all_box_frames, all_device_frames};

    #[tokio::test]
    async fn every_frame_round_trips_through_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for f in all_device_frames() {
                write_frame(&mut a, &f, DEFAULT_MAX_FRAME).await.unwrap();
            }
            for f in all_box_frames() {
                write_frame(&mut a, &f, DEFAULT_MAX_FRAME).await.unwrap();
            }
        });
        for f in all_device_frames() {
            let got: DeviceFrame = read_frame(&mut b, DEFAULT_MAX_FRAME)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, f);
        }
        for f in all_box_frames() {
            let got: BoxFrame = read_frame(&mut b, DEFAULT_MAX_FRAME)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, f);
        }
        writer.await.unwrap();
        assert!(read_frame::<BoxFrame, _>(&mut b, 10)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn oversized_claims_are_refused_before_allocating() {
        // Claims 4 GiB; nothing follows. Must not allocate or wait for it.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let e = read_frame::<DeviceFrame, _>(&mut r, DEFAULT_MAX_FRAME)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooLarge {
                    len: 0xffff_ffff,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.code(), Some(ErrorCode::FrameTooLarge));
        // Exactly at the limit is fine.
        let f = DeviceFrame::Event {
            payload: vec![0; 100],
        };
        let bytes = encode(&f);
        let max = bytes.len() - 4;
        assert_eq!(
            read_frame::<DeviceFrame, _>(&mut &bytes[..], max)
                .await
                .unwrap(),
            Some(f.clone())
        );
        assert!(read_frame::<DeviceFrame, _>(&mut &bytes[..], max - 1)
            .await
            .is_err());
        // The writer refuses too, and writes nothing.
        let mut out = Vec::new();
        let e = write_frame(&mut out, &f, max - 1).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }));
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn a_batch_of_frames_reads_back_one_by_one_through_the_buffer() {
        let frames = [
            BoxFrame::Cancel { id: CommandId(1) },
            BoxFrame::Pong,
            BoxFrame::Cancel { id: CommandId(2) },
        ];
        let mut out = Vec::new();
        for f in &frames {
            encode_into(f, 1024, &mut out).unwrap();
        }
        // Byte for byte what one write per frame would have sent.
        assert_eq!(out, frames.iter().flat_map(encode).collect::<Vec<u8>>());
        // An oversized frame in the middle is refused and leaves the batch
        // as it was.
        let big = BoxFrame::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(100),
        };
        let before = out.clone();
        let e = encode_into(&big, 64, &mut out).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
        assert_eq!(out, before);

        let mut r = frame_reader(&out[..]);
        for f in &frames {
            assert_eq!(
                read_frame::<BoxFrame, _>(&mut r, 1024)
                    .await
                    .unwrap()
                    .as_ref(),
                Some(f)
            );
        }
        assert!(read_frame::<BoxFrame, _>(&mut r, 1024)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn a_frame_reader_holds_no_buffer_while_its_peer_is_quiet_and_loses_no_byte() {
        let refused = |n: usize| BoxFrame::Refused {
            code: ErrorCode::Internal,
            message: "x".repeat(n),
        };
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let mut r = frame_reader(r);
        assert_eq!(r.buffer_capacity(), 0, "no buffer before any byte");
        let mut two = Vec::new();
        encode_into(&BoxFrame::Pong, 1 << 20, &mut two).unwrap();
        encode_into(&refused(10), 1 << 20, &mut two).unwrap();
        w.write_all(&two).await.unwrap();
        async fn read(
            r: &mut FrameReader<tokio::io::DuplexStream>,
        ) -> Result<Result<Option<BoxFrame>, FrameError>, tokio::time::error::Elapsed> {
            let f = read_frame::<BoxFrame, _>(r, 1 << 20);
            tokio::time::timeout(std::time::Duration::from_millis(50), f).await
        }
        assert_eq!(read(&mut r).await.unwrap().unwrap(), Some(BoxFrame::Pong));
        assert_eq!(
            r.buffer_capacity(),
            READ_AHEAD,
            "the second frame waits in the buffer"
        );
        assert_eq!(read(&mut r).await.unwrap().unwrap(), Some(refused(10)));
        assert!(read(&mut r).await.is_err(), "nothing more was sent");
        assert_eq!(r.buffer_capacity(), 0, "quiet: the buffer is given back");

        // A frame that arrives a few bytes at a time, and one larger than
        // the buffer, read whole after their pauses.
        let mut slow = Vec::new();
        encode_into(&refused(100), 1 << 20, &mut slow).unwrap();
        encode_into(&refused(3 * READ_AHEAD), 1 << 20, &mut slow).unwrap();
        let writer = tokio::spawn(async move {
            for part in slow.chunks(7) {
                w.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            w
        });
        for want in [refused(100), refused(3 * READ_AHEAD)] {
            let got = read_frame::<BoxFrame, _>(&mut r, 1 << 20).await.unwrap();
            assert_eq!(got, Some(want));
        }
        drop(writer.await.unwrap());
        assert_eq!(
            read_frame::<BoxFrame, _>(&mut r, 1 << 20).await.unwrap(),
            None
        );
        assert_eq!(r.buffer_capacity(), 0, "the end of the stream frees it too");
    }

    #[tokio::test]
    async fn truncation_and_garbage_are_typed_errors() {
        let bytes = encode(&DeviceFrame::Ping);
        for cut in [1, 2, 3] {
            let e = read_frame::<DeviceFrame, _>(&mut &bytes[..cut], 100)
                .await
                .unwrap_err();
            assert!(matches!(e, FrameError::Truncated), "{e}");
        }
        let long = encode(&DeviceFrame::Event {
            payload: vec![1; 10],
        });
        let e = read_frame::<DeviceFrame, _>(&mut &long[..8], 100)
            .await
            .unwrap_err();
        assert!(matches!(e, FrameError::Truncated), "{e}");

        // Zero-length body, bad inner data, trailing bytes: malformed.
        for body in [
            vec![],
            vec![0x00, 0xff],
            vec![0x04, 0x00],
            vec![0x02, 0x05, 1],
        ] {
            let e = decode::<DeviceFrame>(&body).unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::Malformed), "{body:?}: {e}");
        }
        // The last message a side knows, damaged, is malformed (the
        // count was once one short, so a damaged `UpFrom` read as a newer
        // peer's message); a tag past the known ones is unknown.
        let e = decode::<DeviceFrame>(&[0x0a]).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Malformed), "{e}");
        let e = decode::<DeviceFrame>(&[0x0b]).unwrap_err();
        assert!(
            matches!(e, FrameError::UnknownMessage { tag: 11, known: 11 }),
            "{e}"
        );
        let e = decode::<DeviceFrame>(&[0xc8, 0x01, 0x00]).unwrap_err();
        assert!(
            matches!(e, FrameError::UnknownMessage { tag: 200, .. }),
            "{e}"
        );
        assert_eq!(e.code(), Some(ErrorCode::UnknownMessage));
    }
}
