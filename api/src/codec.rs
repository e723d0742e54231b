//! The gRPC codec of both services: prost's, with a smaller buffer to start each call with.
//!
//! tonic keeps an encode and a decode buffer for as long as a call lasts, 8 KiB each unless told
//! otherwise, and a configuration stream lasts as long as its proxy is connected: at 10,000
//! proxies the controller held some 160 MiB of buffers that were mostly empty, since a stream's
//! messages are a few hundred bytes. A larger message grows its buffer as before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// What a call's buffers start with: room for the typical stream message.
const START_BYTES: usize = 1024;
/// tonic's default: ready messages are sent together up to this much.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(START_BYTES, YIELD_THRESHOLD_BYTES)
}

/// Named in `build.rs` as the codec of every generated client and server.
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}
