// Compiles the protocol with protox (a protobuf compiler in Rust), so no `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/outrigger/v1/discovery.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Shared, not copied: one encoding of a destination goes to every proxy.
        .bytes(".outrigger.v1.DestinationUpdate.destination")
        .bytes(".outrigger.v1.EndpointGroupContent.endpoints")
        .compile_fds(descriptors)?;
    Ok(())
}
