//! Whether a request meets an HTTPRoute match, as Gateway API defines it: every condition the
//! match names must hold, and a match that names none holds for every request.

use std::borrow::Cow;

use http::Request;

use crate::outbound::route::path_has_prefix;
use crate::policy::{HttpPathMatch, HttpRouteMatch};

impl HttpRouteMatch {
    pub(crate) fn matches<B>(&self, request: &Request<B>) -> bool {
        let uri = request.uri();
        self.path
            .as_ref()
            .is_none_or(|path| path_matches(path, uri.path()))
            && self.method.as_ref().is_none_or(|m| m == request.method())
            && self
                .headers
                .iter()
                .all(|header| header.matches(request.headers()))
            && self.query_params.iter().all(|param| {
                query_param(uri.query().unwrap_or(""), &param.name)
                    .is_some_and(|value| param.value.matches(&value))
            })
    }

    /// The prefix a Prefix path match covers: what a ReplacePrefixMatch rewrite replaces.
    pub(crate) fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(HttpPathMatch::Prefix(prefix)) => Some(prefix),
            _ => None,
        }
    }
}

fn path_matches(matcher: &HttpPathMatch, path: &str) -> bool {
    match matcher {
        HttpPathMatch::Exact(exact) => path == exact,
        HttpPathMatch::Prefix(prefix) => path_has_prefix(path, prefix),
        HttpPathMatch::Regex(regex) => regex.is_match(path),
    }
}

/// The decoded value of the first `name` parameter in `query`: the spec has the first one count
/// when a parameter appears more than once. Decoded as browsers write query strings
/// (`application/x-www-form-urlencoded`: `+` is a space).
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use http::Method;
    use regex::Regex;

    use super::*;
    use crate::policy::{HeaderMatch, HeaderValueMatch, QueryParamMatch};

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn get(uri: &str) -> Request<()> {
        request("GET", uri, &[])
    }

    fn path(path: HttpPathMatch) -> HttpRouteMatch {
        HttpRouteMatch {
            path: Some(path),
            ..Default::default()
        }
    }

    fn anchored(pattern: &str) -> Regex {
        Regex::new(&format!("^(?:{pattern})$")).unwrap()
    }

    fn query(params: &[(&str, HeaderValueMatch)]) -> HttpRouteMatch {
        HttpRouteMatch {
            query_params: params
                .iter()
                .map(|(name, value)| QueryParamMatch {
                    name: name.to_string(),
                    value: value.clone(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn exact(value: &str) -> HeaderValueMatch {
        HeaderValueMatch::Exact(value.into())
    }

    #[test]
    fn a_match_without_conditions_matches_every_request() {
        let m = HttpRouteMatch::default();
        assert!(m.matches(&get("/")));
        assert!(m.matches(&request("DELETE", "/any/path?x=1", &[("x-any", "y")])));
        assert!(m.matches(&get("http://example.com")));
        assert_eq!(m.matched_prefix(), None);
    }

    #[test]
    fn an_exact_path_must_equal_the_whole_path() {
        let m = path(HttpPathMatch::Exact("/v2".into()));
        assert!(m.matches(&get("/v2")));
        assert!(m.matches(&get("/v2?query=1")));
        assert!(m.matches(&get("http://echo/v2")));
        for other in ["/v2/", "/v2/example", "/v2example", "/", "/V2"] {
            assert!(!m.matches(&get(other)), "{other}");
        }
        assert_eq!(m.matched_prefix(), None);
    }

    #[test]
    fn a_path_prefix_matches_whole_segments() {
        let m = path(HttpPathMatch::Prefix("/v2".into()));
        for (uri, expected) in [
            ("/v2", true),
            ("/v2/", true),
            ("/v2/example", true),
            ("/v2?x=1", true),
            ("http://echo/v2/example", true),
            ("/v2example", false),
            ("/v", false),
            ("/", false),
            ("/v1/v2", false),
        ] {
            assert_eq!(m.matches(&get(uri)), expected, "{uri}");
        }
        assert_eq!(m.matched_prefix(), Some("/v2"));
    }

    #[test]
    fn a_path_prefix_with_a_trailing_slash_matches_as_one_without() {
        let m = path(HttpPathMatch::Prefix("/v2/".into()));
        assert!(m.matches(&get("/v2")));
        assert!(m.matches(&get("/v2/example")));
        assert!(!m.matches(&get("/v2example")));
        assert_eq!(m.matched_prefix(), Some("/v2/"));
    }

    #[test]
    fn the_root_prefix_matches_every_path() {
        let m = path(HttpPathMatch::Prefix("/".into()));
        for uri in ["/", "/anything", "/a/b/c?d=e", "http://echo"] {
            assert!(m.matches(&get(uri)), "{uri}");
        }
    }

    #[test]
    fn a_path_regex_must_match_the_whole_path() {
        let m = path(HttpPathMatch::Regex(anchored("/v[0-9]+/.*")));
        assert!(m.matches(&get("/v2/example")));
        assert!(m.matches(&get("/v10/?q=not-part-of-the-path")));
        assert!(!m.matches(&get("/api/v2/example")));
        assert!(!m.matches(&get("/vx/")));
        assert_eq!(m.matched_prefix(), None);
    }

    #[test]
    fn a_method_must_equal_the_requests() {
        let m = HttpRouteMatch {
            method: Some(Method::POST),
            ..Default::default()
        };
        assert!(m.matches(&request("POST", "/", &[])));
        assert!(!m.matches(&request("GET", "/", &[])));
    }

    #[test]
    fn a_header_matches_any_of_its_values_by_a_case_insensitive_name() {
        let m = HttpRouteMatch {
            headers: vec![HeaderMatch {
                name: "X-Version".parse().unwrap(),
                value: exact("two"),
            }],
            ..Default::default()
        };
        assert!(m.matches(&request("GET", "/", &[("x-version", "two")])));
        assert!(m.matches(&request("GET", "/", &[("X-VERSION", "two")])));
        assert!(m.matches(&request(
            "GET",
            "/",
            &[("x-version", "one"), ("x-version", "two")]
        )));
        assert!(!m.matches(&request("GET", "/", &[("x-version", "Two")])));
        assert!(!m.matches(&request("GET", "/", &[("x-other", "two")])));
        assert!(!m.matches(&get("/")));
    }

    #[test]
    fn a_header_regex_must_match_the_whole_value() {
        let m = HttpRouteMatch {
            headers: vec![HeaderMatch {
                name: "x-user".parse().unwrap(),
                value: HeaderValueMatch::Regex(anchored("user-[0-9]+")),
            }],
            ..Default::default()
        };
        assert!(m.matches(&request("GET", "/", &[("x-user", "user-42")])));
        assert!(!m.matches(&request("GET", "/", &[("x-user", "user-4x")])));
        assert!(!m.matches(&request("GET", "/", &[("x-user", "a-user-42")])));
    }

    #[test]
    fn every_header_match_must_hold() {
        let m = HttpRouteMatch {
            headers: vec![
                HeaderMatch {
                    name: "version".parse().unwrap(),
                    value: exact("two"),
                },
                HeaderMatch {
                    name: "color".parse().unwrap(),
                    value: exact("orange"),
                },
            ],
            ..Default::default()
        };
        let both = [("version", "two"), ("color", "orange")];
        assert!(m.matches(&request("GET", "/", &both)));
        assert!(!m.matches(&request("GET", "/", &both[..1])));
        assert!(!m.matches(&request("GET", "/", &both[1..])));
    }

    #[test]
    fn every_query_param_match_must_hold() {
        let m = query(&[("animal", exact("whale")), ("color", exact("blue"))]);
        assert!(m.matches(&get("/?animal=whale&color=blue")));
        assert!(m.matches(&get("/?color=blue&other=x&animal=whale")));
        assert!(!m.matches(&get("/?animal=whale")));
        assert!(!m.matches(&get("/?animal=whale&color=green")));
        assert!(!m.matches(&get("/?animal=dolphin&color=blue")));
    }

    #[test]
    fn a_query_param_that_is_missing_does_not_match() {
        let m = query(&[("animal", exact("whale"))]);
        assert!(!m.matches(&get("/")));
        assert!(!m.matches(&get("/?")));
        assert!(!m.matches(&get("/?animals=whale")));
        assert!(!m.matches(&get("/?whale")));
    }

    #[test]
    fn a_query_param_without_a_value_has_the_empty_one() {
        let m = query(&[("debug", exact(""))]);
        assert!(m.matches(&get("/?debug")));
        assert!(m.matches(&get("/?debug=")));
        assert!(!m.matches(&get("/?debug=1")));
    }

    #[test]
    fn the_first_of_a_repeated_query_param_is_the_one_that_counts() {
        let m = query(&[("animal", exact("whale"))]);
        assert!(m.matches(&get("/?animal=whale&animal=dolphin")));
        assert!(!m.matches(&get("/?animal=dolphin&animal=whale")));
    }

    #[test]
    fn query_param_names_are_case_sensitive() {
        let m = query(&[("animal", exact("whale"))]);
        assert!(!m.matches(&get("/?Animal=whale")));
    }

    #[test]
    fn query_param_names_and_values_are_percent_decoded() {
        let m = query(&[("the animal", exact("blue whale/🐋"))]);
        assert!(m.matches(&get("/?the%20animal=blue%20whale%2F%F0%9F%90%8B")));
        assert!(m.matches(&get("/?the+animal=blue+whale/%f0%9f%90%8b")));
        assert!(!m.matches(&get("/?the%20animal=blue%2520whale%2F%F0%9F%90%8B")));
        let m = query(&[("percent", exact("100%"))]);
        assert!(m.matches(&get("/?percent=100%")));
        assert!(m.matches(&get("/?percent=100%25")));
        // Not the byte 1: a sign is no hex digit, and `+` is a space as ever.
        let m = query(&[("sign", exact("% 1"))]);
        assert!(m.matches(&get("/?sign=%+1")));
    }

    #[test]
    fn a_query_param_regex_must_match_the_whole_decoded_value() {
        let m = query(&[("id", HeaderValueMatch::Regex(anchored("[0-9]+ [a-z]+")))]);
        assert!(m.matches(&get("/?id=42%20abc")));
        assert!(!m.matches(&get("/?id=42%20abc!")));
    }

    #[test]
    fn every_kind_of_condition_must_hold_together() {
        let m = HttpRouteMatch {
            rule: 0,
            path: Some(HttpPathMatch::Prefix("/api".into())),
            headers: vec![HeaderMatch {
                name: "x-canary".parse().unwrap(),
                value: exact("true"),
            }],
            query_params: vec![QueryParamMatch {
                name: "v".into(),
                value: exact("2"),
            }],
            method: Some(Method::GET),
        };
        let canary = [("x-canary", "true")];
        assert!(m.matches(&request("GET", "/api/x?v=2", &canary)));
        assert!(!m.matches(&request("POST", "/api/x?v=2", &canary)));
        assert!(!m.matches(&request("GET", "/web?v=2", &canary)));
        assert!(!m.matches(&request("GET", "/api/x?v=1", &canary)));
        assert!(!m.matches(&request("GET", "/api/x?v=2", &[])));
    }
}
