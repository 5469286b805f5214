//! A wrapper that keeps credentials out of logs, errors, `Debug` output and panics.
//!
//! Every client secret, access token, refresh token and API key in the daemon lives in a
//! [`Secret`] from the moment it is read until the moment it is written into an HTTP header or a
//! database parameter. `Debug` and `Display` print `<redacted>`, so a `tracing` field, an error
//! message or a `dbg!` can never leak one by accident; reading the value takes an explicit
//! [`Secret::expose`], which is easy to grep for in review.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// A string that is never printed.
///
/// ```
/// use keap_sync::Secret;
/// let token = Secret::new("at-1234567890");
/// assert_eq!(format!("{token:?} {token}"), "<redacted> <redacted>");
/// assert_eq!(token.expose(), "at-1234567890");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential read from the environment, a file or the token store.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The value of an `Authorization` header with HTTP Basic credentials (RFC 7617): `Basic `
/// and the base64 of `id:secret`. The token endpoint takes the OAuth client's credentials this
/// way. A `Secret` itself, since anyone who reads it has the client secret.
pub(crate) fn basic_credentials(id: &str, secret: &Secret) -> Secret {
    Secret(format!("Basic {}", STANDARD.encode(format!("{id}:{}", secret.expose()))))
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2-token");
    }

    #[test]
    fn basic_credentials_are_rfc_7617s() {
        // The example of RFC 7617, section 2.
        let header = basic_credentials("Aladdin", &Secret::new("open sesame"));
        assert_eq!(header.expose(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(format!("{header:?}"), "<redacted>");
    }
}
