//! HTTP pieces every side uses: the body type, hop-by-hop headers, the errors the proxy turns
//! into responses, and how gRPC callers get them.

pub mod body;
pub mod error;
pub mod grpc;
pub mod headers;
