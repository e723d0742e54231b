// Compiles the protocol with protox (a protobuf compiler in Rust), so no `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/outrigger/v1/discovery.proto",
        "proto/outrigger/v1/identity.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        // Shared, not copied: one encoding of a destination goes to every proxy.
        .bytes(".outrigger.v1.DestinationUpdate.destination")
        .bytes(".outrigger.v1.EndpointGroupContent.endpoints")
        .compile_fds(descriptors)?;
    Ok(())
}
