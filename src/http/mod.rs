//! Port 80: ACME HTTP-01 challenges answered anywhere in the fleet (store,
//! webroot, or one hop to a holder), plain HTTP to https, or to an upstream.

pub mod request;
pub mod route;
pub mod challenge;
pub mod guard;
pub mod ask;
pub mod response;
pub mod handler;
