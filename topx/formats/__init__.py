"""The file formats topx reads and writes for SageMaker's factorization machines: the model artifact
(model.tar.gz of an MXNet parameter file), MXNet's NDArray serialisation, and recordIO-protobuf rows."""
