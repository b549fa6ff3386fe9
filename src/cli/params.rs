//! `--parameters` as the AWS CLI takes it: JSON (`{"portNumber":["80"]}`), the CLI's
//! shorthand (`portNumber=80,localPortNumber=8080`, `command=["ls -l","pwd"]`,
//! `key=a,b` for a list), or `file://PATH` holding either.

use std::collections::BTreeMap;

pub type Parameters = BTreeMap<String, Vec<String>>;

/// Parses the value of `--parameters`.
pub fn parse(input: &str) -> Result<Parameters, String> {
    if let Some(path) = input.strip_prefix("file://") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--parameters file://{path}: {e}"))?;
        return parse_text(text.trim()).map_err(|e| format!("--parameters file://{path}: {e}"));
    }
    parse_text(input.trim()).map_err(|e| format!("--parameters: {e}"))
}

fn parse_text(text: &str) -> Result<Parameters, String> {
    if text.starts_with('{') {
        parse_json(text)
    } else {
        parse_shorthand(text)
    }
}

fn parse_json(text: &str) -> Result<Parameters, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let mut out = Parameters::new();
    for (k, v) in obj {
        let list = match v {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{k}: every value must be a string"))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("{k}: expected a list of strings")),
        };
        out.insert(k.clone(), list);
    }
    Ok(out)
}

/// Splits at top-level `sep` (not inside quotes or brackets).
fn split_top(s: &str, sep: char) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut depth = 0usize;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                cur.push(c);
            }
            Some(_) => cur.push(c),
            None => match c {
                '"' | '\'' => {
                    quote = Some(c);
                    cur.push(c);
                }
                '[' => {
                    depth += 1;
                    cur.push(c);
                }
                ']' => {
                    depth = depth.checked_sub(1).ok_or("unbalanced ']'")?;
                    cur.push(c);
                }
                c if c == sep && depth == 0 => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            },
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".to_owned());
    }
    if depth != 0 {
        return Err("unbalanced '['".to_owned());
    }
    parts.push(cur);
    Ok(parts)
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_owned();
        }
    }
    s.to_owned()
}

fn parse_shorthand(text: &str) -> Result<Parameters, String> {
    if text.is_empty() {
        return Err("empty value".to_owned());
    }
    let mut out = Parameters::new();
    let mut last: Option<String> = None;
    for part in split_top(text, ',')? {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !k.contains(['"', '\'', '[']) => {
                let key = k.trim().to_owned();
                let v = v.trim();
                let values = if v.starts_with('[') && v.ends_with(']') {
                    split_top(&v[1..v.len() - 1], ',')?
                        .iter()
                        .map(|s| unquote(s))
                        .filter(|s| !s.is_empty())
                        .collect()
                } else {
                    vec![unquote(v)]
                };
                out.insert(key.clone(), values);
                last = Some(key);
            }
            _ => {
                // `key=a,b`: a bare item continues the previous key's list.
                let Some(key) = &last else {
                    return Err(format!(
                        "expected KEY=VALUE, got {:?} (JSON must start with '{{')",
                        part.trim()
                    ));
                };
                if let Some(list) = out.get_mut(key) {
                    list.push(unquote(&part));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &[&str])]) -> Parameters {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn forms() {
        let want = p(&[("localPortNumber", &["8080"]), ("portNumber", &["80"])]);
        assert_eq!(parse("portNumber=80,localPortNumber=8080").unwrap(), want);
        assert_eq!(
            parse(r#"{"portNumber":["80"],"localPortNumber":["8080"]}"#).unwrap(),
            want
        );
        assert_eq!(
            parse(r#"command=["ls -l, /tmp","pwd"]"#).unwrap(),
            p(&[("command", &["ls -l, /tmp", "pwd"])])
        );
        assert_eq!(
            parse("command=a,b,host=h").unwrap(),
            p(&[("command", &["a", "b"]), ("host", &["h"])])
        );
        assert_eq!(
            parse(r#"command="echo a=b, c""#).unwrap(),
            p(&[("command", &["echo a=b, c"])])
        );
        let dir = std::env::temp_dir().join(format!("smp-params-{}", std::process::id()));
        std::fs::write(&dir, "{\"portNumber\": \"22\"}\n").unwrap();
        assert_eq!(
            parse(&format!("file://{}", dir.display())).unwrap(),
            p(&[("portNumber", &["22"])])
        );
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn errors() {
        for bad in [
            "",
            "novalue",
            "{",
            "[1]",
            r#"{"a": 1}"#,
            r#"a="x"#,
            "a=[x",
            "file:///nonexistent/x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
