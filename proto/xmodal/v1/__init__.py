"""Generated gRPC stubs of the xmodal.v1 contract (see xmodal.proto; regenerate with `make proto`)."""
