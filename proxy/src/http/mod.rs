//! HTTP pieces every side uses: the body type, hop-by-hop headers, and the errors the proxy turns
//! into responses.

pub mod body;
pub mod error;
pub mod headers;
