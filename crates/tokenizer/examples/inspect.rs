//! Debug helper (temporary).
fn main() {
    for (pre, _) in [("deepseek-llm", 0)] {
        let (pats, _) = kiln_tokenizer::formats::gguf::pre_patterns(pre).unwrap();
        for p in pats {
            if let Err(e) = fancy_regex::Regex::new(p) { println!("{p:?}: {e:?}"); 
                let cs: Vec<char> = p.chars().collect();
                for i in (3..cs.len()).step_by(2) { let s: String = cs[..i].iter().collect(); let t = format!("{s}]"); if fancy_regex::Regex::new(&t).is_err() { println!("fails at {i}: {:?}", &s[s.len().saturating_sub(20)..]); break; } }
            }
        }
    }
}
