//! Tests of the blob store against real servers started by the test (S3 through
//! moto_server).

mod moto;
mod s3;
