//! A port of transformers' `tokenization_utils.Trie` (4.x), which splits text on added tokens.
//!
//! The algorithm is reproduced step by step, quirks included (greedy leftmost match with a
//! longest-match lookahead, partial matches that failed on the current character still taking
//! part in that lookahead), so that the chunks are exactly the ones the slow tokenizer sees.

use std::collections::HashMap;

#[derive(Debug, Clone, Default)]
struct Node {
    children: HashMap<char, usize>,
    terminal: bool,
}

/// Character trie over the added tokens' contents.
#[derive(Debug, Clone)]
pub(crate) struct Trie {
    nodes: Vec<Node>,
}

impl Trie {
    pub(crate) fn new() -> Self {
        Trie {
            nodes: vec![Node::default()],
        }
    }

    /// `Trie.add`: empty words are ignored.
    pub(crate) fn add(&mut self, word: &str) {
        if word.is_empty() {
            return;
        }
        let mut node = 0;
        for c in word.chars() {
            node = match self.nodes[node].children.get(&c) {
                Some(&n) => n,
                None => {
                    self.nodes.push(Node::default());
                    let n = self.nodes.len() - 1;
                    self.nodes[node].children.insert(c, n);
                    n
                }
            };
        }
        self.nodes[node].terminal = true;
    }

    fn child(&self, node: usize, c: char) -> Option<usize> {
        self.nodes[node].children.get(&c).copied()
    }

    /// `Trie.split`: the text cut at every added-token match (matches are their own chunks).
    pub(crate) fn split(&self, text: &str) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let n = chars.len();
        // (start, node), in insertion order == ascending start
        let mut states: Vec<(usize, usize)> = Vec::new();
        let mut offsets: Vec<usize> = vec![0];
        let mut skip = 0usize;
        for current in 0..n {
            let cc = chars[current];
            if skip > 0 && current < skip {
                continue;
            }
            let mut to_remove: Vec<usize> = Vec::new();
            let mut reset = false;
            for k in 0..states.len() {
                let (state_start, node) = states[k];
                if self.nodes[node].terminal {
                    let mut start = state_start;
                    let mut end = current;
                    for &(lookstart, look_node) in &states {
                        let mut look_node = look_node;
                        let mut lookahead_index;
                        if lookstart > start {
                            break;
                        } else if lookstart < start {
                            lookahead_index = current + 1;
                            end = current + 1;
                        } else {
                            lookahead_index = current;
                            end = current;
                        }
                        let mut next_char = chars.get(lookahead_index).copied();
                        if self.nodes[look_node].terminal {
                            start = lookstart;
                            end = lookahead_index;
                            skip = lookahead_index;
                        }
                        while let Some(nc) = next_char {
                            let Some(c) = self.child(look_node, nc) else {
                                break;
                            };
                            look_node = c;
                            lookahead_index += 1;
                            if self.nodes[look_node].terminal {
                                start = lookstart;
                                end = lookahead_index;
                                skip = lookahead_index;
                            }
                            if lookahead_index == n {
                                break;
                            }
                            next_char = chars.get(lookahead_index).copied();
                        }
                    }
                    offsets.push(start);
                    offsets.push(end);
                    reset = true;
                    break;
                } else if let Some(c) = self.child(node, cc) {
                    states[k].1 = c;
                } else {
                    to_remove.push(state_start);
                }
            }
            if reset {
                states.clear();
            } else {
                states.retain(|(s, _)| !to_remove.contains(s));
            }
            if current >= skip {
                if let Some(c) = self.child(0, cc) {
                    states.push((current, c));
                }
            }
        }
        for &(start, node) in &states {
            if self.nodes[node].terminal {
                offsets.push(start);
                offsets.push(n);
                break;
            }
        }
        // cut_text
        offsets.push(n);
        let mut out = Vec::new();
        let mut start = 0usize;
        for end in offsets {
            if start >= end {
                continue;
            }
            out.push(chars[start..end].iter().collect());
            start = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Trie;

    #[test]
    fn docstring_examples() {
        let mut t = Trie::new();
        assert_eq!(
            t.split("[CLS] This is a extra_id_100"),
            vec!["[CLS] This is a extra_id_100"]
        );
        t.add("[CLS]");
        t.add("extra_id_1");
        t.add("extra_id_100");
        assert_eq!(
            t.split("[CLS] This is a extra_id_100"),
            vec!["[CLS]", " This is a ", "extra_id_100"]
        );
        let mut t = Trie::new();
        t.add("A");
        t.add("P");
        t.add("[SPECIAL]");
        assert_eq!(t.split("This is [SPECIAL]"), vec!["This is ", "[SPECIAL]"]);
        let mut t = Trie::new();
        t.add("AB");
        t.add("B");
        t.add("C");
        assert_eq!(t.split("ABC"), vec!["AB", "C"]);
        let mut t = Trie::new();
        t.add("ABC");
        t.add("B");
        t.add("CD");
        assert_eq!(t.split("ABCD"), vec!["ABC", "D"]);
    }
}
