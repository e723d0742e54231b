//! HTTP pieces every side uses: the body type, hop-by-hop headers, the errors the proxy turns
//! into responses, how gRPC callers get them, and how HTTP/1 crosses between proxies over
//! HTTP/2.

pub mod body;
pub mod error;
pub mod grpc;
pub mod headers;
pub mod mesh_protocol;
