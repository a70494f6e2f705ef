//! The transport every client call goes through: the channel, plus the
//! `authorization: Bearer <token>` header when the client has a token.

use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::Service;
use trove_proto::Error;

/// A channel that adds the bearer token, if any, to every request.
#[derive(Debug, Clone)]
pub struct Authenticated {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
}

impl Authenticated {
    /// `channel` sending `token` on every call (`None`: no header).
    pub fn new(channel: Channel, token: Option<&str>) -> Result<Self, Error> {
        let authorization = token
            .map(|token| {
                let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| Error::invalid("token", "must be visible ASCII"))?;
                value.set_sensitive(true);
                Ok::<_, Error>(value)
            })
            .transpose()?;
        Ok(Authenticated {
            channel,
            authorization,
        })
    }

    /// `channel` without a token.
    pub fn plain(channel: Channel) -> Self {
        Authenticated {
            channel,
            authorization: None,
        }
    }
}

impl Service<http::Request<Body>> for Authenticated {
    type Response = <Channel as Service<http::Request<Body>>>::Response;
    type Error = <Channel as Service<http::Request<Body>>>::Error;
    type Future = <Channel as Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        self.channel.call(request)
    }
}
